package netstack

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// TestTapNICSeesBothDirections: a tap sees the pod's packets and the
// stack's replies (the payload in plaintext both ways), stops seeing them
// once stopped, and an unknown NIC is refused.
func TestTapNICSeesBothDirections(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(ctx context.Context, conn net.Conn, _ Flow) {
			defer conn.Close()
			_, _ = io.Copy(conn, conn)
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 43, 1500)
	if _, err := s.TapNIC(p.nic+100, func(bool, []byte) {}); err != ErrUnknownNIC {
		t.Fatalf("TapNIC(unknown) = %v, want ErrUnknownNIC", err)
	}
	var mu sync.Mutex
	var in, out [][]byte
	stop, err := s.TapNIC(p.nic, func(o bool, b []byte) {
		mu.Lock()
		defer mu.Unlock()
		if o {
			out = append(out, bytes.Clone(b))
		} else {
			in = append(in, bytes.Clone(b))
		}
	})
	must(t, err)
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.7"), 9002)
	pc := p.dial(t, "tcp", netip.AddrPort{}, dst)
	msg := []byte("tap-me-plaintext")
	_, err = pc.Write(msg)
	must(t, err)
	buf := make([]byte, len(msg))
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(pc, buf); err != nil {
		t.Fatal(err)
	}
	contains := func(pkts [][]byte) bool {
		for _, b := range pkts {
			if bytes.Contains(b, msg) {
				return true
			}
		}
		return false
	}
	nstest.WaitFor(t, 5*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if !contains(in) || !contains(out) {
			return io.ErrNoProgress
		}
		return nil
	})
	stop()
	stop() // idempotent
	mu.Lock()
	nIn := len(in)
	mu.Unlock()
	_, err = pc.Write(msg)
	must(t, err)
	_, _ = io.ReadFull(pc, buf)
	mu.Lock()
	defer mu.Unlock()
	if len(in) != nIn {
		t.Fatalf("tap saw %d packets after stop", len(in)-nIn)
	}
	if p.nicTaps(s) {
		t.Fatal("tap list not emptied")
	}
}

func (p pod) nicTaps(s *Stack) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.nics[p.nic].taps.Load() != nil
}
