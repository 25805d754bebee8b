package netstack

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

// BenchmarkTerminatedThroughput measures bulk TCP from a process in a pod
// namespace through tm0 into the stack, terminated and drained by the
// handler (io.Copy to io.Discard). One op is 1 MiB, so the MB/s column is
// the throughput. The MTU of tm0 is the main lever (notes/go-deps.md).
//
//	go test -run '^$' -bench TerminatedThroughput -benchtime 2000x ./netstack/
//
// Sub-benchmarks with mode=plain open tm0 without offloads (as agents before
// them did), to tell what the offloads bring from what the endpoint does.
func BenchmarkTerminatedThroughput(b *testing.B) {
	for _, mtu := range []int{1500, 9000, 65520} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			benchTerminated(b, mtu, tun.ModeOffload)
		})
	}
	for _, mtu := range []int{1500, 65520} {
		b.Run(fmt.Sprintf("mtu=%d/mode=plain", mtu), func(b *testing.B) {
			benchTerminated(b, mtu, tun.ModePlain)
		})
	}
}

// benchPod is newPod with tm0 in mode.
func benchPod(b *testing.B, s *Stack, i, mtu int, mode tun.Mode) pod {
	p, fd := newPodNSMode(b, i, mtu, mode)
	id, err := s.AttachTUN(NICConfig{FD: fd, Addrs: []netip.Addr{p.addr4, p.addr6}, MTU: mtu, Name: fmt.Sprintf("bench/pod%d", i)})
	if err != nil {
		unix.Close(fd)
		b.Fatal(err)
	}
	p.nic = id
	return p
}

func benchTerminated(b *testing.B, mtu int, mode tun.Mode) {
	nstest.SkipUnlessRoot(b)
	type result struct {
		n   int64
		err error
	}
	results := make(chan result, 1)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			n, err := io.Copy(io.Discard, conn)
			results <- result{n, err}
		},
	}
	s := newStack(b, Options{Handler: h, Passthrough: &recorder{}})
	p := benchPod(b, s, 20, mtu, mode)
	conn := p.dial(b, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:9999"))

	const chunk = 1 << 20
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for range b.N {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		b.Fatal(err)
	}
	select {
	case r := <-results:
		b.StopTimer()
		if r.err != nil || r.n != int64(b.N)*chunk {
			b.Fatalf("handler read %d bytes (err %v), want %d", r.n, r.err, int64(b.N)*chunk)
		}
	case <-time.After(time.Minute):
		b.Fatal("handler did not finish")
	}
}

// BenchmarkDialedThroughput measures the other direction: the stack dials
// into the pod (as the inbound side of a tunnel does) and writes bulk data
// that a listener in the pod drains. One op is 1 MiB.
//
//	go test -run '^$' -bench DialedThroughput -benchtime 2000x ./netstack/
func BenchmarkDialedThroughput(b *testing.B) {
	for _, mode := range []tun.Mode{tun.ModeOffload, tun.ModePlain} {
		for _, mtu := range []int{1500, 65520} {
			name := fmt.Sprintf("mtu=%d", mtu)
			if mode == tun.ModePlain {
				name += "/mode=plain"
			}
			b.Run(name, func(b *testing.B) {
				benchDialed(b, mtu, mode)
			})
		}
	}
}

func benchDialed(b *testing.B, mtu int, mode tun.Mode) {
	nstest.SkipUnlessRoot(b)
	s := newStack(b, Options{Handler: &testHandler{}, Passthrough: &recorder{}})
	p := benchPod(b, s, 21, mtu, mode)
	l := p.listen(b, "10.200.0.21:7000")
	type result struct {
		n   int64
		err error
	}
	results := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			results <- result{0, err}
			return
		}
		defer c.Close()
		n, err := io.Copy(io.Discard, c)
		results <- result{n, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := s.DialTCP(ctx, p.nic, netip.MustParseAddrPort("10.99.0.7:0"), netip.MustParseAddrPort("10.200.0.21:7000"))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()

	const chunk = 1 << 20
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ResetTimer()
	for range b.N {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := conn.(*Conn).CloseWrite(); err != nil {
		b.Fatal(err)
	}
	select {
	case r := <-results:
		b.StopTimer()
		if r.err != nil || r.n != int64(b.N)*chunk {
			b.Fatalf("pod read %d bytes (err %v), want %d", r.n, r.err, int64(b.N)*chunk)
		}
	case <-time.After(time.Minute):
		b.Fatal("pod did not finish")
	}
}

// BenchmarkTerminatedRR measures a 1-byte ping-pong on an open terminated
// flow (pod -> tm0 -> stack -> handler echo -> back): one op is one round
// trip, so ns/op is the latency the netstack adds to a request/response.
//
//	go test -run '^$' -bench TerminatedRR -benchtime 20000x ./netstack/
func BenchmarkTerminatedRR(b *testing.B) {
	nstest.SkipUnlessRoot(b)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, conn net.Conn, _ Flow) {
			io.Copy(conn, conn)
		},
	}
	s := newStack(b, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(b, s, 22, 65520)
	conn := p.dial(b, "tcp", netip.AddrPort{}, netip.MustParseAddrPort("10.201.0.5:9998"))
	buf := []byte{1}
	b.ResetTimer()
	for range b.N {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
	}
}
