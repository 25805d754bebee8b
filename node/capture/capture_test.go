package capture

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"golang.org/x/net/bpf"
)

// tcp4 builds an IPv4 TCP packet (checksums left zero: not checked here).
func tcp4(src, dst netip.AddrPort, payload string) []byte {
	b := make([]byte, 40+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, 6
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	b[32] = 5 << 4
	b[33] = 0x18
	copy(b[40:], payload)
	return b
}

func tcp6(src, dst netip.AddrPort, payload string) []byte {
	b := make([]byte, 60+len(payload))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(20+len(payload)))
	b[6], b[7] = 6, 64
	s, d := src.Addr().As16(), dst.Addr().As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	binary.BigEndian.PutUint16(b[40:], src.Port())
	binary.BigEndian.PutUint16(b[42:], dst.Port())
	b[52] = 5 << 4
	copy(b[60:], payload)
	return b
}

func ether(ip []byte) []byte {
	e := make([]byte, 14, 14+len(ip))
	e[12], e[13] = 0x08, 0x00
	if ip[0]>>4 == 6 {
		e[12], e[13] = 0x86, 0xdd
	}
	return append(e, ip...)
}

var (
	pod  = netip.MustParseAddrPort("10.1.0.5:40000")
	web  = netip.MustParseAddrPort("10.1.1.7:8080")
	pod6 = netip.MustParseAddrPort("[fd00::5]:40000")
	web6 = netip.MustParseAddrPort("[fd00::7]:8080")
)

// fakeSource emits what the test pushes, as a tap would.
type fakeSource struct {
	mu   sync.Mutex
	emit func([]byte, bool)
}

func (f *fakeSource) source(name string, lt layers.LinkType) Source {
	return Source{Name: name, LinkType: lt, Start: func(emit func([]byte, bool)) (func(), error) {
		f.mu.Lock()
		f.emit = emit
		f.mu.Unlock()
		return func() { f.mu.Lock(); f.emit = nil; f.mu.Unlock() }, nil
	}}
}

func (f *fakeSource) push(pkt []byte, out bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.emit == nil {
		return false
	}
	f.emit(pkt, out)
	return true
}

func waitStarted(t *testing.T, f *fakeSource) {
	t.Helper()
	for i := 0; i < 500; i++ {
		f.mu.Lock()
		ok := f.emit != nil
		f.mu.Unlock()
		if ok {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("source not started")
}

// TestRunWritesPcapng: packets of two interfaces with their direction, the
// port filter, and the packet count ending the capture; pcapgo (and tshark
// when installed) read the file back.
func TestRunWritesPcapng(t *testing.T) {
	tm0, eth0 := &fakeSource{}, &fakeSource{}
	var out bytes.Buffer
	done := make(chan Stats)
	go func() {
		st, err := Run(context.Background(), &out, nil, Request{Port: 8080, MaxPackets: 3},
			[]Source{tm0.source("tm0", layers.LinkTypeRaw), eth0.source("eth0", layers.LinkTypeEthernet)})
		if err != nil {
			t.Error(err)
		}
		done <- st
	}()
	waitStarted(t, tm0)
	waitStarted(t, eth0)
	tm0.push(tcp4(pod, web, "GET / HTTP/1.1\r\n\r\n"), false)
	tm0.push(tcp4(pod, netip.MustParseAddrPort("10.1.1.7:9999"), "filtered out"), false)
	eth0.push(ether(tcp6(web6, pod6, "HTTP/1.1 200 OK\r\n\r\n")), true)
	tm0.push(tcp4(web, pod, "hello"), true)
	var st Stats
	select {
	case st = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("capture did not end at its packet count")
	}
	if st.Reason != "count" || st.Packets != 3 || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}
	tsharkReads(t, out.Bytes(), 3)
	r, err := pcapgo.NewNgReader(bytes.NewReader(out.Bytes()), pcapgo.NgReaderOptions{WantMixedLinkType: true})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		data, ci, err := r.ReadPacketData()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		intf, _ := r.Interface(ci.InterfaceIndex)
		got = append(got, intf.Name+":"+string(bytes.TrimRight(data[len(data)-min(len(data), 5):], "\r\n")))
	}
	if strings.Join(got, ",") != "tm0:1,eth0:K,tm0:hello" {
		t.Fatalf("packets %q", got)
	}
	if r.NInterfaces() != 2 {
		t.Fatalf("%d interfaces", r.NInterfaces())
	}
}

// tsharkReads checks that tshark reads the capture without errors.
func tsharkReads(t *testing.T, pcap []byte, packets int) {
	t.Helper()
	if os.Getenv("KEEP_PCAP") != "" {
		_ = os.WriteFile(os.Getenv("KEEP_PCAP"), pcap, 0o600)
	}
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Log("tshark not installed: skipped the tshark check")
		return
	}
	f := filepath.Join(t.TempDir(), "c.pcapng")
	if err := os.WriteFile(f, pcap, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("tshark", "-r", f, "-T", "fields", "-e", "frame.number").Output()
	if err != nil {
		t.Fatalf("tshark: %v\n%s", err, out)
	}
	if n := len(strings.Fields(string(out))); n != packets {
		t.Fatalf("tshark read %d packets, want %d:\n%s", n, packets, out)
	}
}

// TestRunDropsForSlowReader: while the reader does not read, packets are
// dropped (the sources never wait); a reader that goes away ends the
// capture.
func TestRunDropsForSlowReader(t *testing.T) {
	src := &fakeSource{}
	pr, pw := io.Pipe()
	done := make(chan Stats)
	go func() {
		st, _ := Run(context.Background(), pw, nil, Request{}, []Source{src.source("tm0", layers.LinkTypeRaw)})
		done <- st
	}()
	// Read the header so that Run starts its sources.
	go func() {
		buf := make([]byte, 4096)
		_, _ = pr.Read(buf)
	}()
	waitStarted(t, src)
	start := time.Now()
	for i := 0; i < queueLen+500; i++ {
		if !src.push(tcp4(pod, web, "x"), false) {
			break
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("pushing took %s: the data path waited", d)
	}
	pr.Close() // the reader goes away
	select {
	case st := <-done:
		if st.Reason != "client" || st.Dropped == 0 {
			t.Fatalf("stats %+v: want client gone and drops counted", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("capture did not end when the reader went away")
	}
}

// TestRunEnds: by duration and by cancellation, and bad requests fail.
func TestRunEnds(t *testing.T) {
	src := &fakeSource{}
	st, err := Run(context.Background(), io.Discard, nil, Request{Duration: 50 * time.Millisecond}, []Source{src.source("tm0", layers.LinkTypeRaw)})
	if err != nil || st.Reason != "duration" {
		t.Fatalf("duration: %+v %v", st, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { waitStarted(t, src); cancel() }()
	st, err = Run(ctx, io.Discard, nil, Request{}, []Source{src.source("tm0", layers.LinkTypeRaw)})
	if err != nil || st.Reason != "cancelled" {
		t.Fatalf("cancel: %+v %v", st, err)
	}
	for _, r := range []Request{{Duration: time.Hour}, {MaxPackets: -1}, {MaxBytes: 2 << 30}, {Side: "air"}} {
		if _, err := Run(context.Background(), io.Discard, nil, r, []Source{src.source("tm0", layers.LinkTypeRaw)}); err == nil {
			t.Fatalf("request %+v accepted", r)
		}
	}
}

// TestPortFilter runs the in-kernel filter in x/net/bpf's VM.
func TestPortFilter(t *testing.T) {
	vm, err := bpf.NewVM(portFilter(4143))
	if err != nil {
		t.Fatal(err)
	}
	mesh := netip.MustParseAddrPort("10.0.0.2:4143")
	node := netip.MustParseAddrPort("10.0.0.1:50000")
	frag := tcp4(node, mesh, "x")
	frag[7] = 10 // a fragment offset: no ports in it
	cases := []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"ipv4 to the mesh port", ether(tcp4(node, mesh, "tls")), true},
		{"ipv4 from the mesh port", ether(tcp4(mesh, node, "tls")), true},
		{"ipv4 other port", ether(tcp4(node, netip.MustParseAddrPort("10.0.0.2:80"), "x")), false},
		{"ipv4 fragment", ether(frag), false},
		{"ipv6 to the mesh port", ether(tcp6(netip.MustParseAddrPort("[fd00::1]:5000"), netip.MustParseAddrPort("[fd00::2]:4143"), "x")), true},
		{"ipv6 other port", ether(tcp6(netip.MustParseAddrPort("[fd00::1]:5000"), netip.MustParseAddrPort("[fd00::2]:80"), "x")), false},
		{"arp", append(make([]byte, 12), 0x08, 0x06, 0, 0, 0, 0), false},
	}
	for _, c := range cases {
		n, err := vm.Run(c.pkt)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if (n > 0) != c.want {
			t.Errorf("%s: kept %v, want %v", c.name, n > 0, c.want)
		}
	}
}

func TestPorts(t *testing.T) {
	if _, s, d, ok := Ports(tcp4(pod, web, ""), layers.LinkTypeRaw); !ok || s != pod || d != web {
		t.Fatalf("raw ipv4: %v %v %v", s, d, ok)
	}
	if _, s, d, ok := Ports(ether(tcp6(pod6, web6, "")), layers.LinkTypeEthernet); !ok || s != pod6 || d != web6 {
		t.Fatalf("ethernet ipv6: %v %v %v", s, d, ok)
	}
	for _, b := range [][]byte{nil, {0x45}, {0x60, 0}, make([]byte, 30)} {
		if _, _, _, ok := Ports(b, layers.LinkTypeRaw); ok {
			t.Fatalf("short packet %x parsed", b)
		}
	}
}

// FuzzPorts: no packet makes the parser panic.
func FuzzPorts(f *testing.F) {
	f.Add(tcp4(pod, web, "x"), true)
	f.Add(ether(tcp6(pod6, web6, "x")), false)
	f.Fuzz(func(t *testing.T, b []byte, raw bool) {
		lt := layers.LinkTypeEthernet
		if raw {
			lt = layers.LinkTypeRaw
		}
		Ports(b, lt)
	})
}

// TestSYNFilter runs WatchSYNs' in-kernel filter in x/net/bpf's VM.
func TestSYNFilter(t *testing.T) {
	vm, err := bpf.NewVM(synFilter())
	if err != nil {
		t.Fatal(err)
	}
	withFlags := func(b []byte, ipv6 bool, flags byte) []byte {
		if ipv6 {
			b[14+40+13] = flags
		} else {
			b[14+20+13] = flags
		}
		return b
	}
	cases := []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"ipv4 syn", withFlags(ether(tcp4(pod, web, "")), false, 0x02), true},
		{"ipv4 syn-ack", withFlags(ether(tcp4(pod, web, "")), false, 0x12), false},
		{"ipv4 ack", withFlags(ether(tcp4(pod, web, "x")), false, 0x10), false},
		{"ipv6 syn", withFlags(ether(tcp6(pod6, web6, "")), true, 0x02), true},
		{"ipv6 psh-ack", withFlags(ether(tcp6(pod6, web6, "x")), true, 0x18), false},
		{"arp", append(make([]byte, 12), 0x08, 0x06, 0, 0, 0, 0), false},
	}
	for _, c := range cases {
		n, err := vm.Run(c.pkt)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if (n > 0) != c.want {
			t.Errorf("%s: kept %v, want %v", c.name, n > 0, c.want)
		}
	}
}

// TestRunSourceFails: a source that cannot start (no CAP_NET_RAW, a pod
// namespace gone) fails the capture before any pcapng is written, and the
// sources already started are stopped.
func TestRunSourceFails(t *testing.T) {
	ok := &fakeSource{}
	bad := Source{Name: "eth0", LinkType: layers.LinkTypeEthernet, Start: func(func([]byte, bool)) (func(), error) {
		return nil, errors.New("operation not permitted")
	}}
	var out bytes.Buffer
	_, err := Run(context.Background(), &out, nil, Request{}, []Source{ok.source("tm0", layers.LinkTypeRaw), bad})
	if err == nil || !strings.Contains(err.Error(), "eth0") {
		t.Fatalf("err %v", err)
	}
	if out.Len() != 0 {
		t.Fatalf("%d bytes written before the failure", out.Len())
	}
	if ok.push(tcp4(pod, web, "x"), false) {
		t.Fatal("the started source was not stopped")
	}
}

// TestRunStalledReader: a reader that stops reading (the header, or a
// batch of packets) ends the capture within its grace, and never after
// the duration plus grace; the sources are stopped.
func TestRunStalledReader(t *testing.T) {
	cases := []struct {
		name            string
		readHeader      bool
		duration, grace time.Duration
		want            string
	}{
		{"never reads the header", false, 5 * time.Second, 300 * time.Millisecond, "stalled"},
		{"stops after the header", true, 5 * time.Second, 300 * time.Millisecond, "stalled"},
		// The duration may end it first: then the closing statistics'
		// write is what the deadline bounds.
		{"stalled past the duration", true, 100 * time.Millisecond, 400 * time.Millisecond, "stalled|duration"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := &fakeSource{}
			server, client := net.Pipe()
			t.Cleanup(func() { server.Close(); client.Close() })
			if c.readHeader {
				go func() {
					buf := make([]byte, 64<<10)
					_ = client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
					for {
						if _, err := client.Read(buf); err != nil {
							return // then never reads again
						}
					}
				}()
			}
			type result struct {
				st  Stats
				err error
			}
			done := make(chan result, 1)
			start := time.Now()
			go func() {
				st, err := Run(context.Background(), server, nil, Request{Duration: c.duration, Grace: c.grace, WriteDeadline: server.SetWriteDeadline},
					[]Source{src.source("tm0", layers.LinkTypeRaw)})
				done <- result{st, err}
			}()
			if c.readHeader {
				waitStarted(t, src)
				time.Sleep(80 * time.Millisecond) // the reader has stopped
				for i := 0; i < 100; i++ {
					src.push(tcp4(pod, web, strings.Repeat("x", 1000)), false)
				}
			}
			var r result
			select {
			case r = <-done:
			case <-time.After(c.duration + c.grace + 3*time.Second):
				t.Fatalf("capture still running %s after start with a stalled reader", time.Since(start))
			}
			if !slices.Contains(strings.Split(c.want, "|"), r.st.Reason) {
				t.Fatalf("stats %+v, err %v: want reason %s", r.st, r.err, c.want)
			}
			if d, limit := time.Since(start), min(c.duration+c.grace, c.grace+500*time.Millisecond)+500*time.Millisecond; d > limit {
				t.Fatalf("ended after %s, want within %s (duration %s, grace %s)", d, limit, c.duration, c.grace)
			}
			if src.push(tcp4(pod, web, "after"), false) {
				t.Fatal("source still running after the capture ended")
			}
		})
	}
}

// TestRunQueueBoundedByBytes: with the reader stalled, large packets are
// dropped once queueBytes wait, not after queueLen packets (4096 packets
// of 64 KiB would be 256 MiB per capture).
func TestRunQueueBoundedByBytes(t *testing.T) {
	src := &fakeSource{}
	pr, pw := io.Pipe()
	done := make(chan Stats, 1)
	go func() {
		st, _ := Run(context.Background(), pw, nil, Request{}, []Source{src.source("tm0", layers.LinkTypeRaw)})
		done <- st
	}()
	header := make([]byte, 4096)
	if _, err := pr.Read(header); err != nil { // then the reader stalls
		t.Fatal(err)
	}
	waitStarted(t, src)
	big := tcp4(pod, web, strings.Repeat("x", 60000))
	const pushed = 400
	for i := 0; i < pushed; i++ {
		src.push(big, false)
	}
	pr.Close()
	st := <-done
	fit := queueBytes / len(big)
	if st.Dropped < uint64(pushed-fit-2) {
		t.Fatalf("stats %+v: %d packets of %d bytes pushed to a stalled reader, want at least %d dropped (queue of %d bytes)", st, pushed, len(big), pushed-fit-2, queueBytes)
	}
}

// TestRunCountExact: with packets already queued when the capture starts
// writing, -c N writes exactly N.
func TestRunCountExact(t *testing.T) {
	for _, n := range []int{1, 2, 5} {
		src := &fakeSource{}
		pr, pw := io.Pipe()
		done := make(chan Stats, 1)
		go func() {
			st, _ := Run(context.Background(), pw, nil, Request{MaxPackets: n}, []Source{src.source("tm0", layers.LinkTypeRaw)})
			pw.Close()
			done <- st
		}()
		header := make([]byte, 4096)
		hn, err := pr.Read(header)
		if err != nil {
			t.Fatal(err)
		}
		header = header[:hn]
		waitStarted(t, src)
		for i := 0; i < n+5; i++ { // queued while the writer waits for the reader
			src.push(tcp4(pod, web, "x"), false)
		}
		rest, err := io.ReadAll(pr)
		if err != nil {
			t.Fatal(err)
		}
		st := <-done
		if st.Packets != uint64(n) || st.Reason != "count" {
			t.Fatalf("-c %d: stats %+v", n, st)
		}
		if got := countPackets(t, append(header[:len(header):len(header)], rest...)); got != n {
			t.Fatalf("-c %d: the file holds %d packets", n, got)
		}
	}
}

// countPackets reads a pcapng stream back.
func countPackets(t *testing.T, b []byte) int {
	t.Helper()
	r, err := pcapgo.NewNgReader(bytes.NewReader(b), pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		if _, _, err := r.ReadPacketData(); err != nil {
			return n
		}
		n++
	}
}
