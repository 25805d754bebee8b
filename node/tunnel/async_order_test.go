package tunnel_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// resetDrainer is a stream reset before the splice started: its drain ends
// at once with an error on its own goroutine, and (as when SpliceAsync's
// caller is descheduled) that goroutine finishes before DrainAsync
// returns, so end runs before the pod side's copy has started.
type resetDrainer struct{ net.Conn }

func (d *resetDrainer) DrainAsync(_ io.Writer, _ func(int), done func(error)) {
	ch := make(chan struct{})
	go func() { done(errors.New("peer reset")); close(ch) }()
	<-ch
	time.Sleep(20 * time.Millisecond) // room for a wrongly woken copy to run
}
func (d *resetDrainer) Abort()            { d.Conn.Close() }
func (d *resetDrainer) CloseWrite() error { return nil }

// TestSpliceAsyncEndBeforeCopyStarts: an end that wakes the on-demand copy
// before it has started must neither start a goroutine early (it would
// call the not yet registered cancel: a panic that took the agent down)
// nor a second copy; the splice ends once, with the reset.
func TestSpliceAsyncEndBeforeCopyStarts(t *testing.T) {
	agent, pod := tunneltest.ReadyPipe()
	defer pod.Close()
	x, y := net.Pipe()
	defer y.Close()
	sp := startAsync(context.Background(), &resetDrainer{Conn: x}, agent, tunnel.SpliceOptions{})
	sp.wait(t, 2*time.Second)
	if sp.err == nil {
		t.Fatal("a reset stream ended the splice cleanly")
	}
}

// endedDrainer is a stream whose peer already ended cleanly.
type endedDrainer struct{ net.Conn }

func (d *endedDrainer) DrainAsync(_ io.Writer, _ func(int), done func(error)) { go done(nil) }
func (d *endedDrainer) Abort()                                                { d.Conn.Close() }
func (d *endedDrainer) CloseWrite() error                                     { return nil }
func (d *endedDrainer) Write(b []byte) (int, error)                           { return len(b), nil }

// slowAbort is a pod connection whose abort takes a while (gVisor's locks,
// a preempted goroutine).
type slowAbort struct {
	*tunneltest.ReadyConn
	closed atomic.Bool
}

func (c *slowAbort) Abort() {
	time.Sleep(200 * time.Millisecond)
	c.closed.Store(true)
	c.ReadyConn.Abort()
}

// TestSpliceAsyncDoneAfterClose: done runs only once both connections are
// closed, even when the copy that reports last sees the end while end is
// still closing them (the owner releases the pod's stack slot in done).
func TestSpliceAsyncDoneAfterClose(t *testing.T) {
	agent, pod := tunneltest.ReadyPipe()
	defer pod.Close()
	x, y := net.Pipe()
	defer y.Close()
	b := &slowAbort{ReadyConn: agent}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	closedAtDone := make(chan bool, 1)
	tunnel.SpliceAsync(ctx, &endedDrainer{Conn: x}, b, tunnel.SpliceOptions{}, func(tunnel.SpliceStats, error) {
		closedAtDone <- b.closed.Load()
	})
	time.Sleep(50 * time.Millisecond) // the drained direction ended (half-close)
	cancel()
	time.Sleep(20 * time.Millisecond) // end is now in the pod's slow Abort
	_, _ = pod.Write([]byte("x"))     // the pod's bytes wake the copy, which sees the end
	select {
	case closed := <-closedAtDone:
		if !closed {
			t.Error("done ran before the pod connection was closed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("done not called")
	}
}
