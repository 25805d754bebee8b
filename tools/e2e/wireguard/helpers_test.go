package wireguard

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// serveEcho echoes TCP connections on port inside pod until the client
// half-closes.
func serveEcho(t *testing.T, c *e2eenv.Cluster, pod *corev1.Pod, port int) {
	t.Helper()
	ln, err := namedns.Listen(c.PodNetns(pod), "tcp", ":"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_, _ = io.Copy(conn, conn)
				_ = conn.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}

// transfer sends n bytes (payload repeated, or pseudo-random) to dst from
// inside pod, half-closes, and checks the echo's checksum.
func transfer(t *testing.T, c *e2eenv.Cluster, from *corev1.Pod, dst string, n int, payload []byte) {
	t.Helper()
	if err := tryTransfer(c, from, dst, n, payload, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
}

func tryTransfer(c *e2eenv.Cluster, from *corev1.Pod, dst string, n int, payload []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.PodNetns(from), "tcp", dst)
	if err != nil {
		return fmt.Errorf("dial %s from %s: %w", dst, from.Name, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(io.MultiWriter(conn, sent), 64<<10)
		var src io.Reader = io.LimitReader(rand.NewChaCha8([32]byte{byte(n)}), int64(n))
		if payload != nil {
			src = io.LimitReader(&repeat{b: payload}, int64(n))
		}
		_, err := io.Copy(w, src)
		if err == nil {
			err = w.Flush()
		}
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got := sha256.New()
	m, err := io.Copy(got, conn)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("send to %s: %w", dst, werr)
	}
	if err != nil {
		return fmt.Errorf("read echo from %s: %w", dst, err)
	}
	if int(m) != n || string(sent.Sum(nil)) != string(got.Sum(nil)) {
		return fmt.Errorf("echo from %s: %d bytes, want %d with the same checksum", dst, m, n)
	}
	return nil
}

type repeat struct {
	b []byte
	i int
}

func (r *repeat) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = r.b[r.i%len(r.b)]
		r.i++
	}
	return len(p), nil
}

// serveUDP answers each datagram on port inside pod with "answer:" + it,
// like a DNS server.
func serveUDP(t *testing.T, c *e2eenv.Cluster, pod *corev1.Pod, port int) {
	t.Helper()
	var pc net.PacketConn
	if err := namedns.Do(c.PodNetns(pod), func() error {
		var err error
		pc, err = net.ListenPacket("udp", ":"+strconv.Itoa(port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, addr, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("answer:"), buf[:n]...), addr)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
}

// query sends a datagram from pod to dst and returns the answer (retrying
// a few times, as a DNS client does).
func query(c *e2eenv.Cluster, from *corev1.Pod, dst string, q []byte) ([]byte, error) {
	var lastErr error
	for try := 0; try < 5; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := namedns.DialContext(ctx, c.PodNetns(from), "udp", dst)
		cancel()
		if err != nil {
			return nil, err
		}
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write(q); err != nil {
			// EMSGSIZE after an ICMP fragmentation needed: the kernel
			// fragments the next try.
			conn.Close()
			lastErr = err
			continue
		}
		buf := make([]byte, 65535)
		n, err := conn.Read(buf)
		conn.Close()
		if err == nil {
			return buf[:n], nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("query %s from %s: %w", dst, from.Name, lastErr)
}

func node(c *e2eenv.Cluster, name string) (ip, netns string) {
	for _, n := range c.State.Nodes {
		if n.Name == name {
			return n.IP, n.Netns
		}
	}
	return "", ""
}

// agentMetric sums the samples of a series whose line contains filter.
func agentMetric(t *testing.T, c *e2eenv.Cluster, nodeName, name, filter string) float64 {
	t.Helper()
	v, err := c.AgentMetric(nodeName, name, filter)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// restartAgent kills a node's agent (the cluster's supervisor starts a
// new one, as a DaemonSet would) and waits until the new one is ready.
func restartAgent(t *testing.T, c *e2eenv.Cluster, nodeName string) {
	t.Helper()
	old := c.AgentPID(nodeName)
	if old == 0 {
		t.Fatalf("no agent process for %s", nodeName)
	}
	if err := syscall.Kill(old, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 60*time.Second, "agent of "+nodeName+" restarted and ready", func() error {
		pid := c.AgentPID(nodeName)
		if pid == 0 || pid == old {
			return fmt.Errorf("agent pid %d (old %d)", pid, old)
		}
		return c.AgentReady(nodeName)
	})
}

// captureUnderlay runs tshark on the underlay bridge, capturing what
// passes between the two nodes' addresses and any packet from or to their
// pod CIDRs (the dev cluster routes pod CIDRs via the node addresses
// without encapsulation: a pod packet in clear carries pod addresses, not
// node ones) while fn runs, and returns the pcap path. Captures that miss
// the WireGuard traffic fn makes (a loaded machine: dumpcap starts late)
// are retried.
func captureUnderlay(t *testing.T, c *e2eenv.Cluster, fn func()) string {
	t.Helper()
	ip1, _ := node(c, "node-1")
	ip2, _ := node(c, "node-2")
	filter := "(host " + ip1 + " and host " + ip2 + ")"
	for _, name := range []string{"node-1", "node-2"} {
		n, err := c.Client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("node %s: %v", name, err)
		}
		if len(n.Spec.PodCIDRs) == 0 {
			t.Fatalf("node %s has no pod CIDR", name)
		}
		for _, cidr := range n.Spec.PodCIDRs {
			filter += " or net " + cidr
		}
	}
	for attempt := 1; ; attempt++ {
		pcap := filepath.Join(t.TempDir(), "underlay.pcap")
		cmd := exec.Command("nsenter", "--net=/run/netns/"+c.Name+"-ul", "--", "tshark", "-i", "br0",
			"-f", filter, "-w", pcap)
		stderr := &strings.Builder{}
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatalf("start tshark: %v", err)
		}
		e2eenv.WaitFor(t, 20*time.Second, "tshark capturing", func() error {
			if !strings.Contains(stderr.String(), "Capturing on") {
				return fmt.Errorf("tshark: %q", stderr.String())
			}
			return nil
		})
		time.Sleep(2 * time.Second) // see e2eenv.CaptureUnderlay
		fn()
		time.Sleep(time.Second)
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		if n := countFrames(t, pcap, "udp.port==51820"); n > 0 {
			return pcap
		}
		if attempt == 3 {
			t.Fatalf("no WireGuard datagram in 3 captures of the underlay")
		}
		t.Logf("capture %d saw no WireGuard datagram; again", attempt)
	}
}

// countFrames counts the frames of pcap matching a display filter.
func countFrames(t *testing.T, pcap, filter string) int {
	t.Helper()
	out, err := exec.Command("tshark", "-r", pcap, "-Y", filter, "-T", "fields", "-e", "frame.number").Output()
	if err != nil {
		t.Fatalf("tshark -r %s -Y %q: %v", pcap, filter, err)
	}
	return len(strings.Fields(string(out)))
}

func itoa(n int) string { return strconv.Itoa(n) }

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
