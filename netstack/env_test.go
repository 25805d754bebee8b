package netstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

// Addresses of the test topology. Pod i has 10.200.0.i and fd00:200::i on a
// dummy eth0; the "cluster" ranges 10.201/16 and fd00:201::/64 (service or
// remote pod addresses) and the "remote clients" 10.99/16 and fd00:99::/64
// are routed into tm0.
var (
	clusterV4 = netip.MustParsePrefix("10.201.0.0/16")
	clusterV6 = netip.MustParsePrefix("fd00:201::/64")
	clientsV4 = netip.MustParsePrefix("10.99.0.0/16")
	clientsV6 = netip.MustParsePrefix("fd00:99::/64")
)

func podAddrs(i int) (netip.Addr, netip.Addr) {
	return netip.AddrFrom4([4]byte{10, 200, 0, byte(i)}),
		netip.AddrFrom16([16]byte{0xfd, 0, 0x02, 0, 15: byte(i)})
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// testHandler records flows and delegates to optional funcs. The zero
// value passes everything through.
type testHandler struct {
	decide func(Flow) Decision
	serve  func(context.Context, net.Conn, Flow)

	mu    sync.Mutex
	flows []Flow
}

// drivenConns is a handler that terminates every flow and hands each
// connection (a *Conn) to the test, which drives it; it stays served
// until the stack closes.
func drivenConns(t *testing.T, buffer int) (*testHandler, <-chan *Conn) {
	got := make(chan *Conn, buffer)
	return &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(ctx context.Context, conn net.Conn, _ Flow) {
			c, ok := conn.(*Conn)
			if !ok {
				t.Errorf("ServeConn got %T, want *Conn", conn)
				return
			}
			got <- c
			<-ctx.Done() // the test drives the connection
		},
	}, got
}

func (h *testHandler) HandleFlow(f Flow) Decision {
	h.mu.Lock()
	h.flows = append(h.flows, f)
	h.mu.Unlock()
	if h.decide == nil {
		return Passthrough
	}
	return h.decide(f)
}

func (h *testHandler) ServeConn(ctx context.Context, conn net.Conn, f Flow) {
	defer conn.Close()
	if h.serve != nil {
		h.serve(ctx, conn, f)
	}
}

func (h *testHandler) seen() []Flow {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Flow(nil), h.flows...)
}

// recorder is a PacketWriter that keeps copies of every packet and
// optionally forwards them.
type recorder struct {
	next PacketWriter

	mu   sync.Mutex
	pkts [][]byte
}

func (r *recorder) WritePacket(b []byte) error {
	r.mu.Lock()
	r.pkts = append(r.pkts, append([]byte(nil), b...))
	r.mu.Unlock()
	if r.next != nil {
		return r.next.WritePacket(b)
	}
	return nil
}

func (r *recorder) all() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.pkts...)
}

// wait returns the first recorded packet that match accepts.
func (r *recorder) wait(t testing.TB, what string, match func(packetInfo, []byte) bool) []byte {
	t.Helper()
	var found []byte
	nstest.WaitFor(t, 5*time.Second, func() error {
		for _, p := range r.all() {
			if info, err := parseIP(p); err == nil && match(info, p) {
				found = p
				return nil
			}
		}
		return fmt.Errorf("no %s among %d passthrough packets", what, len(r.all()))
	})
	return found
}

// pod is a network namespace with a veth eth0 holding the pod's
// addresses, and tm0 attached to the stack.
type pod struct {
	ns    nstest.NS
	addr4 netip.Addr
	addr6 netip.Addr
	nic   NICID
}

// newPodNS builds the pod namespace and its tm0 device and returns the
// device's fd without attaching it.
func newPodNS(t testing.TB, i, mtu int) (pod, int) {
	t.Helper()
	return newPodNSMode(t, i, mtu, tun.ModeOffload)
}

// newPodNSMode is newPodNS with tm0 made in mode (tun.ModePlain: as an agent
// before offloads made it).
func newPodNSMode(t testing.TB, i, mtu int, mode tun.Mode) (pod, int) {
	t.Helper()
	ns := nstest.NewNS(t, fmt.Sprintf("pod%d", i))
	a4, a6 := podAddrs(i)
	ns.Do(t, func() error {
		// A veth pair stands in for the primary CNI's interface (the
		// dummy driver may not be available).
		eth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0peer"}
		if err := netlink.LinkAdd(eth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		peer, err := netlink.LinkByName("eth0peer")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return err
		}
		for _, p := range []netip.Prefix{netip.PrefixFrom(a4, 24), netip.PrefixFrom(a6, 64)} {
			addr := &netlink.Addr{IPNet: prefixToIPNet(p), Flags: unix.IFA_F_NODAD}
			if err := netlink.AddrAdd(eth, addr); err != nil {
				return fmt.Errorf("add %s: %w", p, err)
			}
		}
		return netlink.LinkSetUp(eth)
	})
	fd, err := tun.CreateInNetnsMode(ns.Path, "tm0", mtu, mode)
	if err != nil {
		t.Fatal(err)
	}
	ns.Do(t, func() error {
		tm0, err := netlink.LinkByName("tm0")
		if err != nil {
			return err
		}
		for _, r := range []struct {
			dst netip.Prefix
			src netip.Addr
		}{{clusterV4, a4}, {clientsV4, a4}, {clusterV6, a6}, {clientsV6, a6}} {
			route := &netlink.Route{LinkIndex: tm0.Attrs().Index, Dst: prefixToIPNet(r.dst), Src: r.src.AsSlice()}
			if err := netlink.RouteAdd(route); err != nil {
				return fmt.Errorf("route %s: %w", r.dst, err)
			}
		}
		return nil
	})
	return pod{ns: ns, addr4: a4, addr6: a6}, fd
}

// newPod builds pod i and attaches its tm0 to s.
func newPod(t testing.TB, s *Stack, i, mtu int) pod {
	t.Helper()
	p, fd := newPodNS(t, i, mtu)
	id, err := s.AttachTUN(NICConfig{FD: fd, Addrs: []netip.Addr{p.addr4, p.addr6}, MTU: mtu, Name: fmt.Sprintf("test/pod%d", i)})
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	p.nic = id
	return p
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// newStack creates a Stack closed in t.Cleanup.
func newStack(t testing.TB, opts Options) *Stack {
	t.Helper()
	s, err := New(opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// dial connects from inside the pod namespace; the socket stays in that
// namespace. local may be the zero AddrPort.
func (p pod) dial(t testing.TB, network string, local, remote netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	p.ns.Do(t, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if local.IsValid() {
			switch network {
			case "udp":
				d.LocalAddr = net.UDPAddrFromAddrPort(local)
			default:
				d.LocalAddr = net.TCPAddrFromAddrPort(local)
			}
		}
		var err error
		c, err = d.Dial(network, remote.String())
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// listen listens inside the pod namespace.
func (p pod) listen(t testing.TB, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	p.ns.Do(t, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	t.Cleanup(func() { l.Close() })
	return l
}

// echoHalfClose is the server side of the half-close exchange: read to
// EOF, answer "echo:"+data, half-close, and check the peer then closes.
func echoHalfClose(conn net.Conn) error {
	data, err := io.ReadAll(conn)
	if err != nil {
		return fmt.Errorf("server read: %w", err)
	}
	if _, err := conn.Write(append([]byte("echo:"), data...)); err != nil {
		return fmt.Errorf("server write: %w", err)
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return fmt.Errorf("server close write: %w", err)
	}
	return nil
}

// clientHalfClose is the client side: send payload, half-close, read the
// answer to EOF.
func clientHalfClose(conn net.Conn, payload []byte) error {
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		if err == nil {
			err = conn.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(conn)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("client write: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("client read: %w", err)
	}
	if want := append([]byte("echo:"), payload...); !bytes.Equal(got, want) {
		return fmt.Errorf("client got %d bytes, want %d (echo of the payload)", len(got), len(want))
	}
	return nil
}

// readTUN reads packets from fd until match accepts one or timeout passes.
func readTUN(t testing.TB, fd int, timeout time.Duration, match func(packetInfo, []byte) bool) []byte {
	t.Helper()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 65536)
	var skipped int
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("no matching packet on the tun within %v (%d others)", timeout, skipped)
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) || n == 0 {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		n, err = unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		pkt := append([]byte(nil), buf[:n]...)
		if info, err := parseIP(pkt); err == nil && match(info, pkt) {
			return pkt
		}
		skipped++
	}
}

// must fails t with err if it is not nil; for use with errors from other
// goroutines.
func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
