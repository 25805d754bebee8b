package netstack

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// TestConnTryWrite: TryWrite delivers to the pod without waiting, takes
// only what the send buffer holds (a partial write, then ErrWouldBlock)
// while the pod does not read, and every byte it took reaches the pod in
// order.
func TestConnTryWrite(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	h, got := drivenConns(t, 1)
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 41, 65520)
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.5"), 9001)
	pc := p.dial(t, "tcp", netip.AddrPort{}, dst)
	var c *Conn
	select {
	case c = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("connection not served")
	}
	t.Cleanup(func() { c.Close() })

	if n, err := c.TryWrite(nil); n != 0 || err != nil {
		t.Fatalf("TryWrite(nil) = %d, %v", n, err)
	}
	// A small message goes at once.
	if n, err := c.TryWrite([]byte("hello")); n != 5 || err != nil {
		t.Fatalf("TryWrite(hello) = %d, %v; want 5, nil", n, err)
	}
	buf := make([]byte, 5)
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(pc, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("pod read %q, %v", buf, err)
	}
	// The pod stops reading: TryWrite fills what can be buffered, then
	// says ErrWouldBlock instead of waiting.
	pattern := make([]byte, 64<<20)
	for i := range pattern {
		pattern[i] = byte(i * 7)
	}
	sent, partial := 0, false
	deadline := time.Now().Add(10 * time.Second)
	for {
		chunk := pattern[sent:min(sent+64<<10, len(pattern))]
		n, err := c.TryWrite(chunk)
		sent += n
		if n > 0 && n < len(chunk) {
			partial = true
		}
		if errors.Is(err, ErrWouldBlock) {
			if n != 0 {
				t.Fatalf("ErrWouldBlock with %d bytes written", n)
			}
			break
		}
		if err != nil {
			t.Fatalf("TryWrite: %v", err)
		}
		if sent == len(pattern) || time.Now().After(deadline) {
			t.Fatalf("TryWrite never would block (%d bytes taken by a pod that does not read)", sent)
		}
	}
	t.Logf("send buffer took %d bytes before ErrWouldBlock (partial write seen: %v)", sent, partial)
	// Everything taken reaches the pod, in order.
	back := make([]byte, sent)
	if _, err := io.ReadFull(pc, back); err != nil {
		t.Fatalf("pod read: %v", err)
	}
	if !bytes.Equal(back, pattern[:sent]) {
		t.Fatal("the pod read other bytes than TryWrite took")
	}
	// After a close, TryWrite fails with a real error, not ErrWouldBlock.
	c.Close()
	if _, err := c.TryWrite([]byte("x")); err == nil || errors.Is(err, ErrWouldBlock) {
		t.Fatalf("TryWrite after Close: %v, want an error", err)
	}
}
