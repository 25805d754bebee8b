package netstack

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// TestConnResetSeenByWriteIsNotEOF: gVisor reports a pod's RST once. When
// a write to the pod (the tunnel delivering bytes) takes it first, the
// next read must still be an error (ECONNRESET), never io.EOF: the tunnel
// passes an EOF on as a clean half-close, and a reset must never reach the
// far pod as one. Both TryRead and the blocking Read.
func TestConnResetSeenByWriteIsNotEOF(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	h, got := drivenConns(t, 2)
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}})
	p := newPod(t, s, 41, 65520)
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.6"), 9000)

	for _, tc := range []struct {
		name string
		read func(*Conn) error
	}{
		{"TryRead", func(c *Conn) error { _, err := c.TryRead(make([]byte, 8)); return err }},
		{"Read", func(c *Conn) error {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := c.Read(make([]byte, 8))
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc := p.dial(t, "tcp", netip.AddrPort{}, dst)
			var c *Conn
			select {
			case c = <-got:
			case <-time.After(10 * time.Second):
				t.Fatal("connection not served")
			}
			t.Cleanup(func() { c.Close() })
			if err := pc.(*net.TCPConn).SetLinger(0); err != nil {
				t.Fatal(err)
			}
			pc.Close()
			// Write until the RST has arrived and a write took it.
			deadline := time.Now().Add(10 * time.Second)
			for {
				_, err := c.TryWrite([]byte("from the tunnel"))
				if err != nil && !errors.Is(err, ErrWouldBlock) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no write saw the pod's reset")
				}
				time.Sleep(5 * time.Millisecond)
			}
			err := tc.read(c)
			if err == nil || errors.Is(err, io.EOF) || errors.Is(err, ErrWouldBlock) {
				t.Fatalf("%s after a write took the pod's reset: %v, want a reset error", tc.name, err)
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("%s: %v, want ECONNRESET", tc.name, err)
			}
		})
	}
}
