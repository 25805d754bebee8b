package e2eenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// CaptureUnderlay runs tshark on the cluster's underlay bridge while fn
// runs and returns the pcap once it holds a packet matching the display
// filter (the mesh port decoded as TLS). tshark writes through dumpcap,
// which may hold packets until it stops, so the capture is stopped before
// it is read; on a loaded machine it may still miss the traffic, so the
// whole capture is retried a few times. The last miss fails the test with
// the TCP conversations the capture did see.
func CaptureUnderlay(t *testing.T, c *Cluster, filter string, fn func()) (pcap string) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		pcap = filepath.Join(t.TempDir(), "underlay.pcap")
		cmd := exec.Command("nsenter", "--net=/run/netns/"+c.Name+"-ul", "--", "tshark", "-i", "br0", "-f", "tcp", "-w", pcap)
		stderr := &strings.Builder{}
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("start tshark: %v", err)
		}
		WaitFor(t, 20*time.Second, "tshark capturing", func() error {
			if !strings.Contains(stderr.String(), "Capturing on") {
				return fmt.Errorf("tshark: %q", stderr.String())
			}
			return nil
		})
		// dumpcap says "Capturing on" before its socket receives packets:
		// on a loaded machine the first second of a capture went missing
		// (by hand: 4 of 10 short captures incomplete or empty under load,
		// 0 of 15 after waiting 2 s), which is how a short transfer was
		// missed three times in a row in CI.
		time.Sleep(2 * time.Second)
		fn()
		time.Sleep(time.Second) // let the last segments reach the bridge
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		out, _ := exec.Command("tshark", "-r", pcap, "-d", "tcp.port==4143,tls", "-Y", filter).Output()
		if len(strings.TrimSpace(string(out))) > 0 {
			return pcap
		}
		if attempt == 3 {
			conv, _ := exec.Command("tshark", "-r", pcap, "-q", "-z", "conv,tcp").Output()
			t.Fatalf("no packet matching %q in 3 captures of the underlay; the last one's TCP conversations:\n%s", filter, conv)
		}
		t.Logf("capture %d missed %q; again", attempt, filter)
	}
}
