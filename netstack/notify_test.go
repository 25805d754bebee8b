package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// TestConnNotifyReadable: a terminated connection is served with no
// goroutine parked in Read. NotifyReadable fires for the pod's bytes and
// for its FIN, TryRead reads what is buffered and says ErrWouldBlock, then
// io.EOF; a pod's RST is an error, not an end of stream. ReadReady tells
// each of those apart from "nothing yet" without reading.
func TestConnNotifyReadable(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	type served struct {
		conn   *Conn
		signal chan struct{}
		cancel func()
	}
	got := make(chan served, 2)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(ctx context.Context, conn net.Conn, _ Flow) {
			c, ok := conn.(*Conn)
			if !ok {
				t.Errorf("ServeConn got %T, want *Conn", conn)
				return
			}
			sig := make(chan struct{}, 1)
			cancel := c.NotifyReadable(func() {
				select {
				case sig <- struct{}{}:
				default:
				}
			})
			got <- served{conn: c, signal: sig, cancel: cancel}
			<-ctx.Done() // the test drives the connection
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 40, 65520)
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.5"), 9000)

	wait := func(sv served, what string) {
		t.Helper()
		select {
		case <-sv.signal:
		case <-time.After(10 * time.Second):
			t.Fatalf("no readable notification for %s", what)
		}
	}
	// readAll drains what is buffered: the pattern a caller uses.
	readAll := func(sv served) ([]byte, error) {
		var out []byte
		buf := make([]byte, 3) // smaller than the data: several reads
		for {
			n, err := sv.conn.TryRead(buf)
			out = append(out, buf[:n]...)
			if err != nil {
				return out, err
			}
		}
	}

	// Clean end: bytes, then FIN.
	pc := p.dial(t, "tcp", netip.AddrPort{}, dst)
	var sv served
	select {
	case sv = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("connection not served")
	}
	if n, err := sv.conn.TryRead(make([]byte, 8)); n != 0 || !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("TryRead on an idle connection = %d, %v; want ErrWouldBlock", n, err)
	}
	if sv.conn.ReadReady() {
		t.Fatal("ReadReady on an idle connection = true, want false")
	}
	if _, err := pc.Write([]byte("hello, mesh")); err != nil {
		t.Fatal(err)
	}
	var data []byte
	for len(data) < len("hello, mesh") {
		wait(sv, "data")
		b, err := readAll(sv)
		if !errors.Is(err, ErrWouldBlock) {
			t.Fatalf("TryRead after data: %v, want ErrWouldBlock once drained", err)
		}
		data = append(data, b...)
	}
	if string(data) != "hello, mesh" {
		t.Fatalf("read %q", data)
	}
	if sv.conn.ReadReady() {
		t.Fatal("ReadReady once everything was read (no FIN yet) = true, want false")
	}
	if err := pc.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	for {
		wait(sv, "FIN")
		if _, err := readAll(sv); errors.Is(err, io.EOF) {
			if !sv.conn.ReadReady() {
				t.Fatal("ReadReady after the pod's FIN = false, want true (TryRead has io.EOF)")
			}
			break
		} else if !errors.Is(err, ErrWouldBlock) {
			t.Fatalf("after the pod's FIN: %v, want io.EOF", err)
		}
	}
	sv.cancel()
	sv.cancel() // idempotent
	pc.Close()
	sv.conn.Close()

	// Reset: an error, never io.EOF.
	pc2 := p.dial(t, "tcp", netip.AddrPort{}, dst)
	var sv2 served
	select {
	case sv2 = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("second connection not served")
	}
	t.Cleanup(func() { sv2.cancel(); sv2.conn.Close() })
	if err := pc2.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	pc2.Close()
	for {
		wait(sv2, "RST")
		_, err := readAll(sv2)
		if errors.Is(err, ErrWouldBlock) {
			continue
		}
		if err == nil || errors.Is(err, io.EOF) {
			t.Fatalf("after the pod's RST: %v, want a reset error", err)
		}
		if !sv2.conn.ReadReady() {
			t.Fatal("ReadReady after the pod's RST = false, want true (TryRead has the error)")
		}
		break
	}
}
