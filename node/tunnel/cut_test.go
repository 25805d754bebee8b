package tunnel_test

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

// eofOnAbort is a connection whose Read, once aborted, reports io.EOF (as
// a gVisor endpoint may after its own reset: "closed for receive").
type eofOnAbort struct {
	net.Conn // only for the methods the splice does not use
	once     sync.Once
	aborted  chan struct{}
}

func newEOFOnAbort() *eofOnAbort { return &eofOnAbort{aborted: make(chan struct{})} }

func (c *eofOnAbort) Read([]byte) (int, error)    { <-c.aborted; return 0, io.EOF }
func (c *eofOnAbort) Write(b []byte) (int, error) { return len(b), nil }
func (c *eofOnAbort) Abort()                      { c.once.Do(func() { close(c.aborted) }) }
func (c *eofOnAbort) Close() error                { c.Abort(); return nil }
func (c *eofOnAbort) CloseWrite() error           { return nil }
func (c *eofOnAbort) SetDeadline(time.Time) error { return nil }

// halfCloseRecorder counts CloseWrite: a clean half-close passed on.
type halfCloseRecorder struct {
	eofOnAbort
	closeWrites atomic.Int32
}

func (c *halfCloseRecorder) CloseWrite() error { c.closeWrites.Add(1); return nil }

// TestSpliceCutNeverPassedAsEOF: when the splice is cut (here: its context
// ends) and closing one side makes that side read as EOF, the EOF is the
// cut's own doing and must not be passed on to the other side as a clean
// half-close: the other side is aborted, never half-closed.
func TestSpliceCutNeverPassedAsEOF(t *testing.T) {
	for _, async := range []bool{false, true} {
		a := newEOFOnAbort()
		b := &halfCloseRecorder{eofOnAbort: *newEOFOnAbort()}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		if async {
			tunnel.SpliceAsync(ctx, a, b, tunnel.SpliceOptions{}, func(_ tunnel.SpliceStats, err error) { done <- err })
		} else {
			go func() { _, err := tunnel.Splice(ctx, a, b, tunnel.SpliceOptions{}); done <- err }()
		}
		time.Sleep(20 * time.Millisecond)
		cancel()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("async=%v: a cut splice ended cleanly", async)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("async=%v: splice did not end", async)
		}
		if n := b.closeWrites.Load(); n != 0 {
			t.Errorf("async=%v: the cut reached the other side as %d clean half-close(s)", async, n)
		}
	}
}
