package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

func TestNewChecksDependencies(t *testing.T) {
	if _, err := New(Options{}, testLogger(t)); err == nil {
		t.Error("New without a Handler succeeded")
	}
	if _, err := New(Options{Handler: &testHandler{}}, nil); err == nil {
		t.Error("New without a logger succeeded")
	}
	s, err := New(Options{Handler: &testHandler{}}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s.Close()
	if _, err := s.AttachTUN(NICConfig{FD: 0, Addrs: []netip.Addr{pod4.Addr()}, MTU: 1500}); err == nil {
		t.Error("AttachTUN with a non-TUN fd succeeded")
	}
}

// (a) A pod connects through tm0 to an address routed into it; the handler
// terminates; data flows both ways with half-close, over IPv4 and IPv6.
func TestTerminate(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	serverErr := make(chan error, 4)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			serverErr <- echoHalfClose(conn)
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 2, 65520)

	payload := make([]byte, 1<<20)
	rand.Read(payload)
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddrPort("10.201.0.5:8080")},
		{"ipv6", netip.MustParseAddrPort("[fd00:201::5]:8080")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := p.dial(t, "tcp", netip.AddrPort{}, tc.dst)
			must(t, clientHalfClose(conn, payload))
			must(t, <-serverErr)

			flows := h.seen()
			f := flows[len(flows)-1]
			want := Flow{NIC: p.nic, Src: conn.LocalAddr().(*net.TCPAddr).AddrPort(), Dst: tc.dst}
			f.Src = netip.AddrPortFrom(f.Src.Addr().Unmap(), f.Src.Port())
			want.Src = netip.AddrPortFrom(want.Src.Addr().Unmap(), want.Src.Port())
			if f != want {
				t.Errorf("flow = %v, want %v", f, want)
			}
		})
	}
	st, _ := s.NICStats(p.nic)
	if st.TerminatedFlows != 2 || st.SpoofedDrops != 0 || st.PassthroughFlows != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// (b) DialTCP into a pod NIC with a spoofed source reaches a listener in
// the pod, which sees the spoofed client address.
func TestDialSpoofedSource(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	s := newStack(t, Options{Handler: &testHandler{}, Passthrough: rec})
	p := newPod(t, s, 3, 65520)
	l := p.listen(t, "[::]:9000")

	payload := make([]byte, 256<<10)
	rand.Read(payload)
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddrPort("10.99.1.7:40000"), netip.AddrPortFrom(p.addr4, 9000)},
		{"ipv6", netip.MustParseAddrPort("[fd00:99::7]:40001"), netip.AddrPortFrom(p.addr6, 9000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			type accepted struct {
				remote netip.AddrPort
				err    error
			}
			acc := make(chan accepted, 1)
			go func() {
				c, err := l.Accept()
				if err != nil {
					acc <- accepted{err: err}
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
				acc <- accepted{remote: netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()), err: echoHalfClose(c)}
			}()

			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			conn, err := s.DialTCP(ctx, p.nic, tc.src, tc.dst)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			must(t, clientHalfClose(conn, payload))
			a := <-acc
			must(t, a.err)
			if a.remote != tc.src {
				t.Errorf("server saw client %s, want the spoofed %s", a.remote, tc.src)
			}
		})
	}
	// The pod's SYN-ACKs and data were owned by the stack: nothing of
	// these flows leaked to the host.
	for _, pkt := range rec.all() {
		if info, err := parseIP(pkt); err == nil && info.tcp && (info.sport == 9000 || info.dport == 9000) {
			t.Errorf("a packet of a dialed flow was passed through: %+v", info)
		}
	}
	st, _ := s.NICStats(p.nic)
	if st.DialedFlows != 2 {
		t.Errorf("DialedFlows = %d, want 2", st.DialedFlows)
	}

	// Refused dials.
	ctx := context.Background()
	if _, err := s.DialTCP(ctx, p.nic, netip.MustParseAddrPort("10.99.1.7:1"), netip.MustParseAddrPort("10.200.0.99:9000")); err == nil {
		t.Error("dial to an address that is not the pod's succeeded")
	}
	if _, err := s.DialTCP(ctx, p.nic+100, netip.MustParseAddrPort("10.99.1.7:1"), netip.AddrPortFrom(p.addr4, 9000)); !errors.Is(err, ErrUnknownNIC) {
		t.Errorf("dial on an unknown nic: err = %v, want ErrUnknownNIC", err)
	}
	if _, err := s.DialTCP(ctx, p.nic, netip.MustParseAddrPort("[fd00:99::7]:1"), netip.AddrPortFrom(p.addr4, 9000)); err == nil {
		t.Error("dial mixing families succeeded")
	}
}

// (c) A SYN the handler passes through leaves through the host-side TUN
// byte for byte (but for the clamped MSS), as do later packets of the flow
// and SYN retransmissions, without asking the handler again. The host side
// is real: a TUN in a node namespace that forwards to a capture TUN.
func TestPassthroughSYN(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	node := nstest.NewNS(t, "node")
	hostFD, err := tun.CreateInNetns(node.Path, "tmh0", 65520)
	must(t, err)
	t.Cleanup(func() { unix.Close(hostFD) })
	// A capture device: one plain packet per read.
	capFD, err := tun.CreateInNetnsMode(node.Path, "cap0", 65520, tun.ModePlain)
	must(t, err)
	t.Cleanup(func() { unix.Close(capFD) })
	node.Sysctl(t, "net.ipv4.ip_forward", "1")
	node.Sysctl(t, "net.ipv4.conf.all.rp_filter", "0")
	node.Sysctl(t, "net.ipv4.conf.tmh0.rp_filter", "0")
	node.Do(t, func() error {
		link, err := netlink.LinkByName("cap0")
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixToIPNet(clusterV4)})
	})

	rec := &recorder{next: FDWriter(hostFD)}
	h := &testHandler{decide: func(f Flow) Decision {
		if f.Dst.Port() == 8081 {
			return Passthrough
		}
		return Terminate
	}}
	s := newStack(t, Options{Handler: h, Passthrough: rec, UnderlayMTU: 1500})
	p := newPod(t, s, 4, 65520)

	src := netip.AddrPortFrom(p.addr4, 40001)
	dst := netip.MustParseAddrPort("10.201.0.9:8081")
	synOpts := func(mss uint16) []byte {
		o := mssOpt(mss)
		o = append(o, tcpOptNOP, 3, 3, 7, 4, 2, tcpOptNOP, tcpOptNOP)      // wscale 7, sackOK
		o = append(o, tcpOptNOP, tcpOptNOP, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0) // timestamps
		return o
	}
	syn := testPacket{src: src, dst: dst, flags: tcpFlagSYN, seq: 7777, opts: synOpts(9000), id: 0x1234}
	// What must come out: the same SYN with MSS 1460, built independently
	// (the builder computes a fresh checksum), and the kernel's forward of
	// it (TTL decremented, IP checksum updated).
	wantSYN := syn
	wantSYN.opts = synOpts(1460)
	wantForwarded := wantSYN
	wantForwarded.ttl = 63
	isFlow := func(info packetInfo, _ []byte) bool {
		return info.tcp && info.sport == src.Port() && info.dport == dst.Port()
	}

	p.ns.Inject(t, "tm0", syn.bytes())
	got := readTUN(t, capFD, 5*time.Second, isFlow)
	if !bytes.Equal(got, wantForwarded.bytes()) {
		t.Fatalf("host forwarded\n%x\nwant\n%x", got, wantForwarded.bytes())
	}
	if written := rec.wait(t, "passthrough SYN", isFlow); !bytes.Equal(written, wantSYN.bytes()) {
		t.Fatalf("stack wrote\n%x\nwant\n%x", written, wantSYN.bytes())
	}

	// Later packets of the flow, unchanged.
	data := testPacket{src: src, dst: dst, flags: tcpFlagACK | 0x08, seq: 7778, ack: 99, payload: []byte("later data"), id: 0x1235}
	p.ns.Inject(t, "tm0", data.bytes())
	fwd := data
	fwd.ttl = 63
	got = readTUN(t, capFD, 5*time.Second, isFlow)
	if !bytes.Equal(got, fwd.bytes()) {
		t.Fatalf("data packet forwarded as\n%x\nwant\n%x", got, fwd.bytes())
	}

	// A SYN retransmission goes straight through.
	p.ns.Inject(t, "tm0", syn.bytes())
	got = readTUN(t, capFD, 5*time.Second, isFlow)
	if !bytes.Equal(got, wantForwarded.bytes()) {
		t.Fatalf("retransmitted SYN forwarded as\n%x\nwant\n%x", got, wantForwarded.bytes())
	}
	if n := len(h.seen()); n != 1 {
		t.Fatalf("handler asked %d times, want once", n)
	}

	// The pod's own kernel: tm0's MTU gives MSS 65480; the host sees 1460.
	kernelSrc := netip.AddrPortFrom(p.addr4, 41000)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go p.ns.Run(func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(kernelSrc)}
		c, err := d.DialContext(ctx, "tcp", dst.String())
		if err == nil {
			c.Close()
		}
		return err
	})
	got = readTUN(t, capFD, 5*time.Second, func(info packetInfo, _ []byte) bool {
		return info.isPureSYN() && info.sport == kernelSrc.Port()
	})
	if mss := findMSS(got[20:]); mss != 1460 {
		t.Errorf("kernel SYN left with MSS %d, want 1460", mss)
	}
	if !tcpChecksumOK(got, 20) {
		t.Error("kernel SYN left with a bad TCP checksum")
	}
	cancel()

	// Counters move after the write that the capture TUN already saw.
	nstest.WaitFor(t, 2*time.Second, func() error {
		st, _ := s.NICStats(p.nic)
		if st.PassthroughFlows != 2 || st.MSSClamped < 3 || st.PassthroughPackets < 4 || st.TrackedFlows != 2 {
			return fmt.Errorf("stats = %+v", st)
		}
		return nil
	})
}

// (d) A packet from a source that is not the pod's is dropped and counted;
// it reaches neither the handler nor the host.
func TestSpoofedSourceDropped(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	h := &testHandler{decide: func(Flow) Decision { return Terminate }}
	s := newStack(t, Options{Handler: h, Passthrough: rec})
	p := newPod(t, s, 5, 1500)

	spoofed := netip.MustParseAddrPort("10.200.0.77:40000")
	p.ns.Inject(t, "tm0", testPacket{src: spoofed, dst: dst4, flags: tcpFlagSYN, opts: mssOpt(1460)}.bytes())
	p.ns.Inject(t, "tm0", testPacket{src: spoofed, dst: dst4, proto: 17, payload: []byte("dns?")}.bytes())
	p.ns.Inject(t, "tm0", testPacket{src: netip.MustParseAddrPort("[fd00:200::77]:1"), dst: dst6, flags: tcpFlagSYN}.bytes())
	// Link-local sources are dropped but are not spoofing.
	p.ns.Inject(t, "tm0", testPacket{src: netip.MustParseAddrPort("[fe80::1]:1"), dst: dst6, proto: 17}.bytes())
	// A packet from the pod itself still passes, so the drops above were
	// not an accident of the path.
	p.ns.Inject(t, "tm0", testPacket{src: netip.AddrPortFrom(p.addr4, 5353), dst: dst4, proto: 17, payload: []byte("ok")}.bytes())

	nstest.WaitFor(t, 5*time.Second, func() error {
		st, _ := s.NICStats(p.nic)
		if st.SpoofedDrops != 3 || st.OtherDrops != 1 || st.PassthroughPackets != 1 {
			return fmt.Errorf("stats = %+v; want 3 spoofed, 1 other drop, 1 passthrough", st)
		}
		return nil
	})
	if n := len(h.seen()); n != 0 {
		t.Errorf("handler saw %d flows from spoofed sources", n)
	}
	for _, pkt := range rec.all() {
		if info, _ := parseIP(pkt); info.src != p.addr4 {
			t.Errorf("passed through a packet from %s", info.src)
		}
	}
}

// (e) UDP and ICMP from the pod go to the host writer unchanged.
func TestUDPAndICMPPassthrough(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	s := newStack(t, Options{Handler: &testHandler{}, Passthrough: rec, UnderlayMTU: 1500})
	p := newPod(t, s, 6, 65520)

	for _, dst := range []netip.AddrPort{
		netip.MustParseAddrPort("10.201.0.7:5353"),
		netip.MustParseAddrPort("[fd00:201::7]:5353"),
	} {
		c := p.dial(t, "udp", netip.AddrPort{}, dst)
		if _, err := c.Write([]byte("query " + dst.String())); err != nil {
			t.Fatal(err)
		}
		local := c.LocalAddr().(*net.UDPAddr).AddrPort()
		got := rec.wait(t, "udp datagram to "+dst.String(), func(info packetInfo, _ []byte) bool {
			return info.proto == 17 && info.dst == dst.Addr()
		})
		info, _ := parseIP(got)
		if info.src != local.Addr().Unmap() || !bytes.HasSuffix(got, []byte("query "+dst.String())) {
			t.Errorf("udp packet %x: src %s, want %s and the payload", got, info.src, local.Addr())
		}
	}

	echo := testPacket{src: netip.AddrPortFrom(p.addr4, 0), dst: netip.MustParseAddrPort("10.201.0.7:0"), proto: 1,
		payload: []byte{8, 0, 0xf7, 0xfe, 0, 1, 0, 0}} // echo request id 1 seq 0
	p.ns.Inject(t, "tm0", echo.bytes())
	got := rec.wait(t, "icmp echo", func(info packetInfo, _ []byte) bool { return info.proto == 1 })
	if !bytes.Equal(got, echo.bytes()) {
		t.Errorf("icmp passed through as %x, want %x", got, echo.bytes())
	}
	nstest.WaitFor(t, 2*time.Second, func() error {
		if st, _ := s.NICStats(p.nic); st.PassthroughPackets < 3 || st.MSSClamped != 0 {
			return fmt.Errorf("stats = %+v", st)
		}
		return nil
	})
}

// A passthrough SYN-ACK of a connection that entered the pod through eth0
// (not owned by the stack) is passed through with its MSS clamped.
func TestPassthroughSYNACKClamped(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	h := &testHandler{}
	s := newStack(t, Options{Handler: h, Passthrough: rec, UnderlayMTU: 1450})
	p := newPod(t, s, 7, 65520)

	synack := testPacket{src: netip.AddrPortFrom(p.addr6, 80), dst: netip.MustParseAddrPort("[fd00:99::5]:51000"),
		flags: tcpFlagSYN | tcpFlagACK, opts: mssOpt(65460)}
	p.ns.Inject(t, "tm0", synack.bytes())
	want := synack
	want.opts = mssOpt(1390)
	got := rec.wait(t, "syn-ack", func(info packetInfo, _ []byte) bool { return info.tcp && info.sport == 80 })
	if !bytes.Equal(got, want.bytes()) {
		t.Errorf("syn-ack passed through as\n%x\nwant\n%x", got, want.bytes())
	}
	if len(h.seen()) != 0 {
		t.Error("a SYN-ACK was offered to the handler")
	}
}

// DetachNIC aborts the pod's connections and closes its fd; the persistent
// tm0 can be re-opened and attached again (an agent restart).
func TestDetachAndReattach(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	served := make(chan error, 2)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			_, err := io.Copy(io.Discard, conn) // blocks until the conn dies
			served <- err
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 8, 9000)

	conn := p.dial(t, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:80"))
	if _, err := conn.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	nstest.WaitFor(t, 5*time.Second, func() error {
		if st, _ := s.NICStats(p.nic); st.TerminatedFlows != 1 {
			return errors.New("flow not terminated yet")
		}
		return nil
	})
	must(t, s.DetachNIC(p.nic))
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return after DetachNIC")
	}
	if _, ok := s.NICStats(p.nic); ok {
		t.Error("stats of a detached nic still reported")
	}
	if err := s.DetachNIC(p.nic); !errors.Is(err, ErrUnknownNIC) {
		t.Errorf("second detach: err = %v, want ErrUnknownNIC", err)
	}

	fd, err := tun.OpenInNetns(p.ns.Path, "tm0")
	must(t, err)
	id, err := s.AttachTUN(NICConfig{FD: fd, Addrs: []netip.Addr{p.addr4, p.addr6}, MTU: 9000, Name: "test/pod8"})
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if id == p.nic {
		t.Error("nic id reused")
	}
	// A TUN has one reader: a second open of tm0 fails while attached.
	if fd2, err := tun.OpenInNetns(p.ns.Path, "tm0"); err == nil {
		unix.Close(fd2)
		t.Error("tm0 opened twice")
	}
	// An address can belong to one NIC only.
	fd2, err := tun.CreateInNetns(p.ns.Path, "tm1", 9000)
	must(t, err)
	if _, err := s.AttachTUN(NICConfig{FD: fd2, Addrs: []netip.Addr{p.addr4}, MTU: 9000}); err == nil {
		t.Error("second nic with the same address attached")
	}
	unix.Close(fd2)

	conn2 := p.dial(t, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:80"))
	if _, err := conn2.Write([]byte("again")); err != nil {
		t.Fatal(err)
	}
	nstest.WaitFor(t, 5*time.Second, func() error {
		if st, _ := s.NICStats(id); st.TerminatedFlows != 1 {
			return errors.New("flow on the re-attached nic not terminated")
		}
		return nil
	})
}

// (f) Close stops every goroutine the stack (and gVisor under it) started
// and closes every fd it owns, including the TUN endpoints' own duplicates,
// even with a ServeConn blocked on its connection and a dialed connection open.
func TestCloseReleasesGoroutinesAndFDs(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	// Warm up lazily created runtime fds (netpoll) before the baseline.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	l.Close()

	p1, fd1 := newPodNS(t, 10, 65520)
	p2, fd2 := newPodNS(t, 11, 1500)
	l2 := p2.listen(t, "[::]:7000")
	baseFDs := nstest.OpenFDs(t)
	baseG := runtime.NumGoroutine()

	served := make(chan struct{})
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(ctx context.Context, conn net.Conn, _ Flow) {
			defer close(served)
			io.Copy(io.Discard, conn) // returns only when the conn is aborted
		},
	}
	s, err := New(Options{Handler: h, Passthrough: &recorder{}, FlowIdleTimeout: time.Second}, testLogger(t))
	must(t, err)
	id1, err := s.AttachTUN(NICConfig{FD: fd1, Addrs: []netip.Addr{p1.addr4, p1.addr6}, MTU: 65520})
	must(t, err)
	p1.nic = id1
	id2, err := s.AttachTUN(NICConfig{FD: fd2, Addrs: []netip.Addr{p2.addr4, p2.addr6}, MTU: 1500})
	must(t, err)
	p2.nic = id2

	// A terminated flow from pod 1, left open.
	conn := p1.dial(t, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:80"))
	if _, err := conn.Write([]byte("hold")); err != nil {
		t.Fatal(err)
	}
	// A dialed flow into pod 2, left open.
	dialed, err := s.DialTCP(context.Background(), p2.nic, netip.MustParseAddrPort("10.99.0.1:1234"), netip.AddrPortFrom(p2.addr4, 7000))
	must(t, err)
	accepted, err := l2.Accept()
	must(t, err)
	// Some passthrough.
	p1.dial(t, "udp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.7:53")).Write([]byte("x"))
	nstest.WaitFor(t, 5*time.Second, func() error {
		if st, _ := s.NICStats(p1.nic); st.TerminatedFlows != 1 || st.PassthroughPackets == 0 {
			return fmt.Errorf("stats = %+v", st)
		}
		return nil
	})

	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("Close hung:\n%s", buf[:runtime.Stack(buf, true)])
	}
	<-served
	s.Close() // idempotent
	if _, err := s.DialTCP(context.Background(), p2.nic, netip.MustParseAddrPort("10.99.0.1:1"), netip.AddrPortFrom(p2.addr4, 7000)); !errors.Is(err, ErrClosed) {
		t.Errorf("DialTCP after Close: err = %v, want ErrClosed", err)
	}
	if _, err := s.AttachTUN(NICConfig{FD: 0, Addrs: []netip.Addr{p1.addr4}, MTU: 1500}); err == nil {
		t.Error("AttachTUN after Close succeeded")
	}
	if err := s.DetachNIC(p1.nic); !errors.Is(err, ErrClosed) {
		t.Errorf("DetachNIC after Close: err = %v, want ErrClosed", err)
	}
	if _, err := dialed.Read(make([]byte, 1)); err == nil {
		t.Error("dialed conn still readable after Close")
	}
	dialed.Close()
	accepted.Close()
	conn.Close()

	nstest.WaitFor(t, 5*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > baseG {
			buf := make([]byte, 1<<20)
			return fmt.Errorf("%d goroutines, baseline %d:\n%s", n, baseG, buf[:runtime.Stack(buf, true)])
		}
		return nil
	})
	nstest.WaitFor(t, 2*time.Second, func() error {
		var leaked []string
		for fd, target := range nstest.OpenFDs(t) {
			if baseFDs[fd] != target {
				leaked = append(leaked, fmt.Sprintf("%d -> %s", fd, target))
			}
		}
		// The dialer sockets the test opened in the pods are closed by
		// t.Cleanup later; only count what the stack could have opened.
		var stackLeaks []string
		for _, l := range leaked {
			if !strings.Contains(l, "socket:") {
				stackLeaks = append(stackLeaks, l)
			}
		}
		if len(stackLeaks) > 0 {
			return fmt.Errorf("fds opened and not closed: %v", stackLeaks)
		}
		return nil
	})
	// The TUN fds handed to the stack are closed.
	for _, fd := range []int{fd1, fd2} {
		if target, ok := nstest.OpenFDs(t)[fd]; ok && target == "/dev/net/tun" {
			t.Errorf("tun fd %d still open", fd)
		}
	}
}

// Many flows at once from two pods, terminated and passed through, under
// the race detector.
func TestConcurrentFlows(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	h := &testHandler{
		decide: func(f Flow) Decision {
			if f.Dst.Port() == 8081 {
				return Passthrough
			}
			return Terminate
		},
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			echoHalfClose(conn)
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: rec, UnderlayMTU: 1500})
	pods := []pod{newPod(t, s, 30, 65520), newPod(t, s, 31, 9000)}

	const perPod = 16
	errc := make(chan error, 2*perPod*len(pods))
	payload := make([]byte, 64<<10)
	rand.Read(payload)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, p := range pods {
		for i := range perPod {
			dst := netip.MustParseAddrPort(fmt.Sprintf("10.201.0.%d:80", i+1))
			if i%2 == 1 {
				dst = netip.MustParseAddrPort(fmt.Sprintf("[fd00:201::%d]:80", i+1))
			}
			conn := p.dial(t, "tcp", netip.AddrPort{}, dst)
			go func() { errc <- clientHalfClose(conn, payload) }()
			// A passthrough flow nobody answers: its SYNs reach the host.
			go func() {
				errc <- p.ns.Run(func() error {
					d := net.Dialer{}
					c, err := d.DialContext(ctx, "tcp", fmt.Sprintf("10.201.1.%d:8081", i+1))
					if err == nil {
						c.Close()
						return errors.New("passthrough flow connected to nobody")
					}
					return nil
				})
			}()
		}
	}
	for range perPod * len(pods) {
		must(t, <-errc)
	}
	nstest.WaitFor(t, 10*time.Second, func() error {
		for _, p := range pods {
			st, _ := s.NICStats(p.nic)
			if st.TerminatedFlows != perPod || st.PassthroughFlows != perPod {
				return fmt.Errorf("nic %d: stats = %+v", p.nic, st)
			}
		}
		return nil
	})
	cancel()
	for range perPod * len(pods) {
		must(t, <-errc)
	}
}

// TestRollingUpgrade: a pod whose tm0 an agent before offloads made (no
// IFF_VNET_HDR) is served in that mode, then, after the agent restarts
// with this version, re-opened with offloads in place (same device, its
// routes kept) and served with super-packets; after a rollback the device
// gives an older agent complete packets (no partial checksums left on).
func TestRollingUpgrade(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	serverErr := make(chan error, 4)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			serverErr <- echoHalfClose(conn)
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p, fd := newPodNSMode(t, 12, 65520, tun.ModePlain)
	addrs := []netip.Addr{p.addr4, p.addr6}
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	exchange := func(id NICID) NICStats {
		t.Helper()
		conn := p.dial(t, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:8080"))
		must(t, clientHalfClose(conn, payload))
		must(t, <-serverErr)
		st, _ := s.NICStats(id)
		return st
	}
	tm0Index := func() int {
		var idx int
		p.ns.Do(t, func() error {
			l, err := netlink.LinkByName("tm0")
			if err == nil {
				idx = l.Attrs().Index
			}
			return err
		})
		return idx
	}
	index := tm0Index()

	// The old agent's device, served by this stack as it is.
	id, err := s.AttachTUN(NICConfig{FD: fd, Addrs: addrs, MTU: 65520, Name: "test/pod12"})
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if st := exchange(id); st.SuperPackets != 0 || st.TerminatedFlows != 1 {
		t.Fatalf("plain device: stats %+v, want one flow and no super-packets", st)
	}
	must(t, s.DetachNIC(id))

	// The new agent re-opens it: migrated, offloads on, routes kept.
	fd, err = tun.OpenInNetns(p.ns.Path, "tm0")
	must(t, err)
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModeOffload {
		unix.Close(fd)
		t.Fatalf("re-opened tm0 in mode %v (%v), want offload", mode, err)
	}
	id, err = s.AttachTUN(NICConfig{FD: fd, Addrs: addrs, MTU: 65520, Name: "test/pod12"})
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if tm0Index() != index {
		t.Fatal("tm0 was re-created, not re-opened")
	}
	for range 2 {
		if st := exchange(id); st.TerminatedFlows == 0 {
			t.Fatalf("migrated device: stats %+v", st)
		}
	}
	// 1 MiB through a 65520 MTU: the pod's kernel coalesces writes it
	// could not send at once into super-packets; whether it does depends on
	// timing, so they are logged, not required.
	st, _ := s.NICStats(id)
	t.Logf("migrated device: %d super-packets", st.SuperPackets)
	must(t, s.DetachNIC(id))

	// Rollback: an older agent attaches without IFF_VNET_HDR and without
	// touching offloads; the pod's next SYN must arrive complete.
	var oldFD int
	p.ns.Do(t, func() error {
		f, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq("tm0")
		if err != nil {
			unix.Close(f)
			return err
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(f, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(f)
			return err
		}
		oldFD = f
		return nil
	})
	t.Cleanup(func() { unix.Close(oldFD) })
	go p.ns.Run(func() error {
		c, err := net.DialTimeout("tcp", "10.201.0.5:8081", 2*time.Second)
		if err == nil {
			c.Close()
		}
		return nil
	})
	syn := readTUN(t, oldFD, 5*time.Second, func(info packetInfo, _ []byte) bool {
		return info.isPureSYN() && info.dport == 8081
	})
	if !tcpChecksumOK(syn, 20) {
		t.Fatal("after a rollback the pod's SYN has a partial checksum: offloads were left on")
	}
}

// TestOffloadsAtSmallMTU: with tm0 at MTU 1500 the pod's kernel sends TSO
// super-packets (taken whole by gVisor) and receives gVisor's (GSO out, one
// write for many segments); 1 MiB echoes intact both ways over IPv4 and
// IPv6, on a terminated flow and on one dialed into the pod.
func TestOffloadsAtSmallMTU(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	serverErr := make(chan error, 4)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			serverErr <- echoHalfClose(conn)
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 13, 1500)
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	for _, dst := range []string{"10.201.0.5:8080", "[fd00:201::5]:8080"} {
		conn := p.dial(t, "tcp", netip.AddrPort{}, netip.MustParseAddrPort(dst))
		must(t, clientHalfClose(conn, payload))
		must(t, <-serverErr)
	}
	st, _ := s.NICStats(p.nic)
	if st.SuperPackets == 0 {
		t.Errorf("no super-packets from the pod at MTU 1500: stats %+v", st)
	}

	// Dialed into the pod: the pod echoes what the stack sends.
	l := p.listen(t, "[::]:7000")
	go func() {
		c, err := l.Accept()
		if err != nil {
			serverErr <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		serverErr <- echoHalfClose(c)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := s.DialTCP(ctx, p.nic, netip.MustParseAddrPort("[fd00:99::7]:0"), netip.AddrPortFrom(p.addr6, 7000))
	must(t, err)
	defer conn.Close()
	must(t, clientHalfClose(conn, payload))
	must(t, <-serverErr)
}
