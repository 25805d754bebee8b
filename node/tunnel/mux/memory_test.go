package mux_test

import (
	"context"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
	"github.com/tunmesh/tunmesh/node/workers"
)

// idleStreams opens n streams spliced as the agents splice them (client
// agent: pod <-> stream; server agent: stream <-> pod), moves a message
// each way on each, leaves them idle and reports the heap and goroutines
// they hold, per stream, both agents' share together. The "pods" are
// in-memory pipes, so the pods' own sockets are not counted. With async,
// the pods are read on demand (tunneltest.ReadyPipe, as a netstack
// connection is) and both agents use tunnel.SpliceAsync, the server's
// handler holding its stream (Stream.Hold) and returning, as the agents
// do; otherwise both block in tunnel.Splice on plain pipes. With a pool,
// both agents start their per-stream goroutines on it (as the agent
// does), and its workers are counted apart: they are bounded, not per
// stream.
func idleStreams(tb testing.TB, n int, async bool, pool *workers.Pool) (heapPerStream, stackPerStream, goroutinesPerStream float64) {
	ctx, cancel := context.WithCancel(context.Background())
	var splices sync.WaitGroup
	serverPods := make(chan io.ReadWriter, n)
	c, s := tunneltest.TLSPair(tb)
	var goHook func(func())
	poolGoroutines := func() int { return 0 }
	if pool != nil {
		goHook = pool.Go
		poolGoroutines = func() int { st := pool.Stats(); return st.Idle + st.Busy }
	}
	client := mux.Client(c, mux.Config{Go: goHook})
	server := mux.Server(s, mux.Config{MaxStreams: n + 1, Go: goHook}, func(st *mux.Stream) {
		st.Accept()
		if async {
			agentSide, pod := tunneltest.ReadyPipe()
			serverPods <- pod
			release := st.Hold()
			splices.Add(1)
			tunnel.SpliceAsync(ctx, st, agentSide, tunnel.SpliceOptions{Go: goHook}, func(tunnel.SpliceStats, error) {
				release()
				splices.Done()
			})
			return
		}
		agentSide, pod := tunneltest.Pipe()
		serverPods <- pod
		tunnel.Splice(ctx, st, agentSide, tunnel.SpliceOptions{})
	})
	var clientPods []io.ReadWriter
	defer func() {
		cancel()
		splices.Wait()
		client.Close()
		server.Close()
		client.Wait()
		server.Wait()
	}()

	measure := func() (uint64, uint64, int) {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse, ms.StackInuse, runtime.NumGoroutine() - poolGoroutines()
	}
	heap0, stack0, g0 := measure()
	msg := make([]byte, 1024)
	for range n {
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			tb.Fatal(err)
		}
		var pod io.ReadWriter
		splices.Add(1)
		if async {
			agentSide, p := tunneltest.ReadyPipe()
			pod = p
			tunnel.SpliceAsync(ctx, agentSide, st, tunnel.SpliceOptions{Go: goHook}, func(tunnel.SpliceStats, error) { splices.Done() })
		} else {
			agentSide, p := tunneltest.Pipe()
			pod = p
			go func() { defer splices.Done(); tunnel.Splice(ctx, agentSide, st, tunnel.SpliceOptions{}) }()
		}
		clientPods = append(clientPods, pod)
		// A request and its answer, then silence.
		if _, err := pod.Write(msg); err != nil {
			tb.Fatal(err)
		}
		sp := <-serverPods
		if _, err := io.ReadFull(sp, msg); err != nil {
			tb.Fatal(err)
		}
		if _, err := sp.Write(msg); err != nil {
			tb.Fatal(err)
		}
		if _, err := io.ReadFull(pod, msg); err != nil {
			tb.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond) // splices settle into their idle reads
	heap1, stack1, g1 := measure()
	runtime.KeepAlive(clientPods)
	return float64(int64(heap1)-int64(heap0)) / float64(n), float64(int64(stack1)-int64(stack0)) / float64(n), float64(g1-g0) / float64(n)
}

// TestIdleStreamCost keeps the cost of an idle meshed connection in the
// tunnel small: no 64 KiB copy buffers held while idle (version 2 held
// 2 x 64 KiB per agent, 256 KiB per connection across both agents, plus a
// TLS connection each), and, as the agents splice (SpliceAsync over
// connections read on demand), no goroutine at all.
func TestIdleStreamCost(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 1000 streams")
	}
	t.Run("async", func(t *testing.T) {
		heap, stack, gr := idleStreams(t, 1000, true, nil)
		t.Logf("per idle stream, both agents: %.0f bytes of heap, %.0f bytes of goroutine stacks, %.2f goroutines", heap, stack, gr)
		if heap > 32<<10 {
			t.Errorf("an idle stream holds %.0f bytes of heap, want at most 32 KiB", heap)
		}
		// Neither direction parks a goroutine: the stream drains itself
		// (Stream.DrainAsync), the pod's side is copied on demand, and
		// neither agent's owner of the connection waits for its end.
		if gr > 0.01 {
			t.Errorf("an idle stream holds %.2f goroutines, want 0", gr)
		}
	})
	t.Run("async-workers", func(t *testing.T) {
		pool := workers.New(workers.Options{})
		t.Cleanup(pool.Close)
		heap, stack, gr := idleStreams(t, 1000, true, pool)
		st := pool.Stats()
		t.Logf("per idle stream, both agents: %.0f bytes of heap, %.0f bytes of goroutine stacks, %.2f goroutines besides the pool's %d workers (%d tasks)", heap, stack, gr, st.Idle+st.Busy, st.Tasks)
		if heap > 32<<10 {
			t.Errorf("an idle stream holds %.0f bytes of heap, want at most 32 KiB", heap)
		}
		if gr > 0.01 {
			t.Errorf("an idle stream holds %.2f goroutines, want 0", gr)
		}
		// Each stream's server handler ran on the pool, and idle
		// workers stay bounded.
		if st.Tasks < 1000 {
			t.Errorf("the pool ran %d tasks for 1000 streams, want at least 1000", st.Tasks)
		}
		if st.Idle > workers.DefaultMaxIdle {
			t.Errorf("%d idle workers, want at most %d", st.Idle, workers.DefaultMaxIdle)
		}
	})
	t.Run("splice", func(t *testing.T) {
		heap, stack, gr := idleStreams(t, 1000, false, nil)
		t.Logf("per idle stream, both agents: %.0f bytes of heap, %.0f bytes of goroutine stacks, %.1f goroutines", heap, stack, gr)
		if heap > 32<<10 {
			t.Errorf("an idle stream holds %.0f bytes of heap, want at most 32 KiB", heap)
		}
		// The blocking Splice: the stream drains itself, only the
		// splice's own copy of the pod's bytes waits (1 per agent).
		if gr > 2.5 {
			t.Errorf("an idle stream holds %.1f goroutines, want at most 2 (1 per agent: the splice copying pod -> tunnel)", gr)
		}
	})
}

// BenchmarkIdleStreamCost reports the same as metrics:
// go test -run '^$' -bench IdleStreamCost -benchtime 1x ./node/tunnel/mux/
func BenchmarkIdleStreamCost(b *testing.B) {
	for _, async := range []bool{true, false} {
		name := "splice"
		if async {
			name = "async"
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				heap, stack, gr := idleStreams(b, 1000, async, nil)
				b.ReportMetric(heap, "heap-B/stream")
				b.ReportMetric(stack, "stack-B/stream")
				b.ReportMetric(gr, "goroutines/stream")
			}
		})
	}
}

// BenchmarkIdleConnectionCost reports what one idle pooled connection
// costs, both agents together (client and server session, their TLS
// connections and goroutines), after one stream came and went:
// go test -run '^$' -bench IdleConnectionCost -benchtime 1x ./node/tunnel/mux/
func BenchmarkIdleConnectionCost(b *testing.B) {
	for range b.N {
		const n = 100
		measure := func() (uint64, uint64, int) {
			runtime.GC()
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			return ms.HeapInuse, ms.StackInuse, runtime.NumGoroutine()
		}
		// The certificates and listeners of TLSPair are made first so
		// that only the sessions are measured.
		type tlsPair struct{ c, s net.Conn }
		pairs := make([]tlsPair, n)
		for i := range pairs {
			c, s := tunneltest.TLSPair(b)
			pairs[i] = tlsPair{c, s}
		}
		heap0, stack0, g0 := measure()
		var sessions []*mux.Session
		for _, p := range pairs {
			client := mux.Client(p.c, mux.Config{})
			server := mux.Server(p.s, mux.Config{}, echo)
			sessions = append(sessions, client, server)
			st, err := client.OpenStream(hdr, false)
			if err != nil {
				b.Fatal(err)
			}
			st.Write([]byte("hello"))
			st.CloseWrite()
			io.Copy(io.Discard, st)
			st.Close()
		}
		time.Sleep(100 * time.Millisecond)
		heap1, stack1, g1 := measure()
		b.ReportMetric(float64(heap1-heap0)/n, "heap-B/conn")
		b.ReportMetric(float64(stack1-stack0)/n, "stack-B/conn")
		b.ReportMetric(float64(g1-g0)/n, "goroutines/conn")
		for _, s := range sessions {
			s.Close()
		}
		for _, s := range sessions {
			s.Wait()
		}
	}
}

// TestTinyFramesCostTheirBytes: a peer sending one-byte Data frames on a
// stream nobody reads (its handler has not accepted it yet) makes the
// receiver hold about those bytes, not a receive buffer per frame (each
// frame used to pin a 2 KiB chunk: 64 Ki frames held 128 MiB).
func TestTinyFramesCostTheirBytes(t *testing.T) {
	const frames = 64 << 10
	conn, s := rawServer(t, func(st *mux.Stream) { <-st.Session().Done() })
	go io.Copy(io.Discard, conn)
	wire := frame(mux.FrameOpen, 0, 1, hdr)
	one := frame(mux.FrameData, 0, 1, []byte("x"))
	for range frames {
		wire = append(wire, one...)
	}
	// The marker stream's Open proves every frame before it was parsed.
	wire = append(wire, frame(mux.FrameOpen, 0, 3, hdr)...)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := conn.Write(wire); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { n, _, _ := s.Load(); return n == 2 })
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(wire)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d one-byte frames held: heap grew by %d bytes", frames, grown)
	if s.Err() != nil {
		t.Fatalf("session ended: %v", s.Err())
	}
	// The payload is 64 KiB; allow chunk slack and the wire buffer's noise.
	if grown > 2<<20 {
		t.Errorf("heap grew by %d bytes for %d bytes of payload", grown, frames)
	}
}

// waitFor polls cond until it holds, failing the test after 5s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
	}
}
