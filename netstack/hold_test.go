package netstack

// These tests splice a netstack Conn with node/tunnel's SpliceAsync, the
// way the agent serves pods: the contract between the two (readable
// callbacks on gVisor's goroutines, TryRead's would-block, Hold) only
// shows with both. node/tunnel does not import netstack; only this test
// imports node/tunnel (TestDependencyBoundary checks the package, not its
// tests).

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/workers"
)

// holdHandler terminates every flow and hands each connection to serve,
// which may Hold it and return; unlike testHandler it does not close the
// connection when serve returns.
type holdHandler struct {
	serve func(ctx context.Context, c *Conn, f Flow)
}

func (h *holdHandler) HandleFlow(Flow) Decision { return Terminate }
func (h *holdHandler) ServeConn(ctx context.Context, conn net.Conn, f Flow) {
	h.serve(ctx, conn.(*Conn), f)
}

// sinkConn is a tunnel side that takes everything written to it and
// drains itself (tunnel.AsyncDrainer) without ever sending: an idle
// tunnel stream. Close ends its drain with an error, as a stream's abort
// does.
type sinkConn struct {
	mu      sync.Mutex
	got     bytes.Buffer
	done    func(error)
	closed  bool
	stalled chan struct{} // while not nil and open, Write waits on it
	wrote   chan struct{}
}

func newSink() *sinkConn { return &sinkConn{wrote: make(chan struct{}, 1)} }

func (s *sinkConn) DrainAsync(_ io.Writer, _ func(int), done func(error)) {
	s.mu.Lock()
	s.done = done
	s.mu.Unlock()
}

func (s *sinkConn) Write(b []byte) (int, error) {
	s.mu.Lock()
	st := s.stalled
	s.mu.Unlock()
	if st != nil {
		<-st
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, net.ErrClosed
	}
	s.got.Write(b)
	select {
	case s.wrote <- struct{}{}:
	default:
	}
	return len(b), nil
}

func (s *sinkConn) bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.got.Bytes()...)
}

func (s *sinkConn) Close() error {
	s.mu.Lock()
	done := s.done
	first := !s.closed
	s.closed = true
	s.mu.Unlock()
	if first && done != nil {
		go done(errors.New("sink: closed")) // the drain's end comes from a goroutine that may block
	}
	return nil
}

func (s *sinkConn) Read([]byte) (int, error)         { return 0, errors.New("sink: not readable") }
func (s *sinkConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (s *sinkConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (s *sinkConn) SetDeadline(time.Time) error      { return nil }
func (s *sinkConn) SetReadDeadline(time.Time) error  { return nil }
func (s *sinkConn) SetWriteDeadline(time.Time) error { return nil }

// TestConnHoldSpliceAsync: ServeConn holds each connection, splices it
// with SpliceAsync and returns. Then an idle meshed connection costs no
// goroutine; the pod's bytes still reach the tunnel side; Stack.Close
// waits for the held connections, whose splices end (the context) and
// release them; a Hold after Close is refused.
//
// With a worker pool (Options.Go), the pool's idle workers are counted
// apart: they are bounded, not per connection.
func TestConnHoldSpliceAsync(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	t.Run("go", func(t *testing.T) { testConnHoldSpliceAsync(t, nil) })
	t.Run("workers", func(t *testing.T) {
		pool := workers.New(workers.Options{})
		t.Cleanup(pool.Close)
		testConnHoldSpliceAsync(t, pool)
	})
}

func testConnHoldSpliceAsync(t *testing.T, pool *workers.Pool) {
	var goHook func(func())
	poolGoroutines := func() int { return 0 }
	if pool != nil {
		goHook = pool.Go
		poolGoroutines = func() int { st := pool.Stats(); return st.Idle + st.Busy }
	}
	type served struct {
		sink *sinkConn
		c    *Conn
	}
	got := make(chan served, 64)
	var ended sync.WaitGroup
	var endErrs sync.Map
	h := &holdHandler{serve: func(ctx context.Context, c *Conn, f Flow) {
		release, ok := c.Hold()
		if !ok {
			t.Errorf("Hold refused while the stack runs")
			c.Abort()
			return
		}
		sink := newSink()
		ended.Add(1)
		tunnel.SpliceAsync(ctx, c, sink, tunnel.SpliceOptions{Go: goHook}, func(_ tunnel.SpliceStats, err error) {
			endErrs.Store(f.Src, err)
			ended.Done()
			release()
		})
		got <- served{sink: sink, c: c}
	}}
	s, err := New(Options{Handler: h, Passthrough: &recorder{}, Go: goHook}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			s.Close()
		}
	})
	p := newPod(t, s, 44, 65520)
	dst := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.7"), 9100)

	settle := func() int {
		time.Sleep(100 * time.Millisecond)
		runtime.GC()
		return runtime.NumGoroutine() - poolGoroutines()
	}
	const n = 50
	g0 := settle()
	var conns []served
	var pods []net.Conn
	for i := range n {
		pc := p.dial(t, "tcp", netip.AddrPort{}, dst)
		pods = append(pods, pc)
		var sv served
		select {
		case sv = <-got:
		case <-time.After(10 * time.Second):
			t.Fatalf("connection %d not served", i)
		}
		conns = append(conns, sv)
		msg := []byte("hello from the pod")
		if _, err := pc.Write(msg); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for !bytes.Equal(sv.sink.bytes(), msg) {
			if time.Now().After(deadline) {
				t.Fatalf("connection %d: tunnel side got %q, want %q", i, sv.sink.bytes(), msg)
			}
			select {
			case <-sv.sink.wrote:
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	g1 := settle()
	perConn := float64(g1-g0) / n
	t.Logf("%d idle spliced connections: %d goroutines before, %d after (%.2f per connection)", n, g0, g1, perConn)
	if perConn > 0.1 {
		t.Errorf("an idle spliced connection holds %.2f goroutines, want 0", perConn)
	}
	if pool != nil {
		// Each SYN's work and each first copy pass ran on the pool.
		st := pool.Stats()
		t.Logf("pool: %+v", st)
		if st.Tasks < 2*n {
			t.Errorf("pool ran %d tasks for %d connections, want at least %d", st.Tasks, n, 2*n)
		}
	}

	// A stalled tunnel side does not stall gVisor: the callback only
	// starts the copy, so while connection 0's copy waits in Write, the
	// other connections (on the same TCP processors) still deliver.
	stall := make(chan struct{})
	conns[0].sink.mu.Lock()
	conns[0].sink.stalled = stall
	conns[0].sink.mu.Unlock()
	if _, err := pods[0].Write([]byte("stuck")); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < n; i++ {
		if _, err := pods[i].Write([]byte("!")); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := 1; i < n; i++ {
		for !bytes.HasSuffix(conns[i].sink.bytes(), []byte("!")) {
			if time.Now().After(deadline) {
				t.Fatalf("connection %d stalled behind connection 0's stalled tunnel side", i)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	close(stall)
	for !bytes.HasSuffix(conns[0].sink.bytes(), []byte("stuck")) {
		if time.Now().After(deadline) {
			t.Fatal("connection 0's bytes not delivered once its tunnel side took them")
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Close waits for the held connections: their splices end on the
	// Stack's context and release them.
	closeDone := make(chan struct{})
	go func() { s.Close(); close(closeDone) }()
	select {
	case <-closeDone:
	case <-time.After(20 * time.Second):
		t.Fatal("Stack.Close did not return: a held connection was never released")
	}
	closed = true
	ended.Wait() // every splice reported before Close returned
	endErrs.Range(func(_, v any) bool {
		if err, _ := v.(error); !errors.Is(err, context.Canceled) {
			t.Errorf("splice ended with %v, want context.Canceled (the Stack closed)", err)
		}
		return true
	})
	if _, ok := conns[0].c.Hold(); ok {
		t.Error("Hold after Close: ok, want refused")
	}
}
