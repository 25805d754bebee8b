package tunnel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
	"github.com/tunmesh/tunmesh/node/workers"
)

// asyncSplice runs SpliceAsync and delivers its end on a channel.
type asyncSplice struct {
	done  chan struct{}
	stats tunnel.SpliceStats
	err   error
	calls atomic.Int32
}

func startAsync(ctx context.Context, a, b net.Conn, opts tunnel.SpliceOptions) *asyncSplice {
	sp := &asyncSplice{done: make(chan struct{})}
	tunnel.SpliceAsync(ctx, a, b, opts, func(st tunnel.SpliceStats, err error) {
		if sp.calls.Add(1) != 1 {
			panic("SpliceAsync's done called twice")
		}
		sp.stats, sp.err = st, err
		close(sp.done)
	})
	return sp
}

func (sp *asyncSplice) wait(t testing.TB, max time.Duration) {
	t.Helper()
	select {
	case <-sp.done:
	case <-time.After(max):
		t.Fatalf("SpliceAsync's done not called within %v", max)
	}
}

// oneWriter fails the test if Write is ever entered by two goroutines at
// once: an on-demand copy must never run twice for one direction.
type oneWriter struct {
	net.Conn
	t       testing.TB
	writing atomic.Int32
}

func (w *oneWriter) Write(p []byte) (int, error) {
	if w.writing.Add(1) != 1 {
		w.t.Errorf("two goroutines write one direction at once")
	}
	defer w.writing.Add(-1)
	return w.Conn.Write(p)
}

func (w *oneWriter) CloseWrite() error {
	return w.Conn.(interface{ CloseWrite() error }).CloseWrite()
}

// TestSpliceAsyncNoLostWakeup hammers the on-demand copy: many small
// writes from the pod with random pauses (none, a yield, microseconds,
// a millisecond), so readable callbacks race with the copy going idle.
// Every byte must arrive, in order, with exact stats, and then the pod's
// clean end and the far end's reply and clean end (a half-close both
// ways) must end the splice cleanly.
//
// The second half of the rounds runs the copies on a worker pool
// (SpliceOptions.Go), as the agent does.
func TestSpliceAsyncNoLostWakeup(t *testing.T) {
	leakCheck(t)
	linger := tunnel.SetLinger(0)
	t.Cleanup(func() { tunnel.SetBeforeIdle(nil); tunnel.SetLinger(linger) })
	pool := workers.New(workers.Options{})
	t.Cleanup(pool.Close)
	for round := range 20 {
		opts := tunnel.SpliceOptions{}
		if round >= 10 {
			opts.Go = pool.Go
		}
		if round%2 == 1 {
			// Half the rounds widen the window between "nothing to
			// read" and "idle", so that writes land in it.
			tunnel.SetBeforeIdle(func() { time.Sleep(20 * time.Microsecond) })
		} else {
			tunnel.SetBeforeIdle(nil)
		}
		// Rounds 0-1 and 4-5 and so on let the copy exit at once;
		// the others linger (a shorter linger than the default, so
		// that lingers also time out between writes).
		if round%4 < 2 {
			tunnel.SetLinger(0)
		} else {
			tunnel.SetLinger(30 * time.Microsecond)
		}
		agent, pod := tunneltest.ReadyPipe()
		b, far := tunneltest.Pipe()
		sp := startAsync(t.Context(), agent, &oneWriter{Conn: b, t: t}, opts)

		rng := rand.New(rand.NewPCG(uint64(round), 7))
		var want bytes.Buffer
		got := make(chan []byte)
		var received atomic.Int64
		go func() {
			var all []byte
			buf := make([]byte, 4096)
			for {
				n, err := far.Read(buf)
				all = append(all, buf[:n]...)
				received.Add(int64(n))
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Errorf("far end read: %v", err)
					break
				}
			}
			got <- all
		}()
		for i := range 1000 {
			msg := make([]byte, 1+rng.IntN(300))
			for j := range msg {
				msg[j] = byte(i + j)
			}
			want.Write(msg)
			if _, err := pod.Write(msg); err != nil {
				t.Fatalf("pod write: %v", err)
			}
			switch rng.IntN(8) {
			case 7:
				// A request that waits for its delivery: a wake-up
				// lost here is not rescued by a later write.
				deadline := time.Now().Add(5 * time.Second)
				for received.Load() < int64(want.Len()) {
					if time.Now().After(deadline) {
						t.Fatalf("round %d: %d of %d bytes delivered after 5s: a lost wake-up", round, received.Load(), want.Len())
					}
					time.Sleep(20 * time.Microsecond)
				}
			case 0:
				time.Sleep(time.Duration(rng.IntN(50)) * time.Microsecond)
			case 1:
				time.Sleep(time.Millisecond)
			case 2, 3:
				// runtime.Gosched through a zero sleep
				time.Sleep(0)
			}
		}
		if err := pod.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		var all []byte
		select {
		case all = <-got:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: far end got no EOF (a lost wake-up?)", round)
		}
		if !bytes.Equal(all, want.Bytes()) {
			t.Fatalf("round %d: far end got %d bytes, want %d (equal prefix: %d)", round, len(all), want.Len(), commonPrefix(all, want.Bytes()))
		}
		// Half-close: the other direction still works after the pod's FIN.
		reply := []byte("the answer after your FIN")
		go func() {
			far.Write(reply)
			far.CloseWrite()
		}()
		back, err := io.ReadAll(pod)
		if err != nil || !bytes.Equal(back, reply) {
			t.Fatalf("pod read %q, %v; want %q", back, err, reply)
		}
		sp.wait(t, 5*time.Second)
		if sp.err != nil {
			t.Errorf("round %d: SpliceAsync ended with %v, want a clean end", round, sp.err)
		}
		if sp.stats.AToB != int64(want.Len()) || sp.stats.BToA != int64(len(reply)) {
			t.Errorf("round %d: stats %+v, want AToB %d BToA %d", round, sp.stats, want.Len(), len(reply))
		}
		if agent.Aborted() || !agent.Closed() {
			t.Errorf("round %d: pod connection aborted %v closed %v; want closed cleanly", round, agent.Aborted(), agent.Closed())
		}
		if n := agent.Watchers(); n != 0 {
			t.Errorf("round %d: %d readable callbacks still registered after the end", round, n)
		}
		far.Close()
	}
	if st := pool.Stats(); st.Tasks < 10 {
		t.Errorf("the pool ran %d copies in 10 rounds, want at least one per round", st.Tasks)
	}
}

func commonPrefix(a, b []byte) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

// TestSpliceAsyncStalledTunnel: while the tunnel side does not take bytes
// (its Write blocks), the pod's writes, which run the readable callbacks
// on their goroutine as gVisor's TCP processor does, still return at once:
// the callback never waits for the copy. Cancelling then ends the splice
// (an abort) with no goroutine left.
func TestSpliceAsyncStalledTunnel(t *testing.T) {
	leakCheck(t)
	ctx, cancel := context.WithCancel(t.Context())
	agent, pod := tunneltest.ReadyPipe()
	b, far := tunneltest.Pipe() // far never reads: b's Write blocks
	t.Cleanup(func() { far.Close() })
	sp := startAsync(ctx, agent, b, tunnel.SpliceOptions{})
	chunk := bytes.Repeat([]byte("x"), 16<<10)
	for i := range 256 { // 4 MiB that cannot go anywhere
		start := time.Now()
		if _, err := pod.Write(chunk); err != nil {
			t.Fatalf("pod write %d: %v", i, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("pod write %d took %v: the readable callback blocked", i, d)
		}
	}
	if agent.Notified() == 0 {
		t.Fatal("no readable callback ran")
	}
	cancel()
	sp.wait(t, 5*time.Second)
	if !errors.Is(sp.err, context.Canceled) {
		t.Errorf("SpliceAsync = %v, want context.Canceled", sp.err)
	}
	if !agent.Aborted() {
		t.Error("pod connection not aborted after the cancel")
	}
}

// TestSpliceAsyncEnds: a clean end is passed on as a clean end, a reset
// as an abort, on both sides, exactly as Splice does.
func TestSpliceAsyncEnds(t *testing.T) {
	t.Run("pod reset aborts the tunnel side", func(t *testing.T) {
		leakCheck(t)
		agent, pod := tunneltest.ReadyPipe()
		b, far := tunneltest.TCPPair(t)
		sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{})
		if _, err := pod.Write([]byte("partial")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 7)
		if _, err := io.ReadFull(far, buf); err != nil {
			t.Fatal(err)
		}
		pod.Reset()
		sp.wait(t, 5*time.Second)
		if sp.err == nil || errors.Is(sp.err, io.EOF) {
			t.Errorf("SpliceAsync = %v, want the pod's reset", sp.err)
		}
		checkAborted(t, "tcp", far)
		if sp.stats.AToB != 7 {
			t.Errorf("stats %+v, want AToB 7", sp.stats)
		}
	})
	t.Run("tunnel reset aborts the pod side", func(t *testing.T) {
		leakCheck(t)
		agent, pod := tunneltest.ReadyPipe()
		b, far := tunneltest.TCPPair(t)
		sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{})
		far.SetLinger(0)
		far.Close()
		sp.wait(t, 5*time.Second)
		if !errors.Is(sp.err, syscall.ECONNRESET) {
			t.Errorf("SpliceAsync = %v, want ECONNRESET", sp.err)
		}
		if !agent.Aborted() {
			t.Error("pod connection closed, want aborted")
		}
		pod.Close()
	})
	t.Run("clean both ways", func(t *testing.T) {
		leakCheck(t)
		agent, pod := tunneltest.ReadyPipe()
		b, far := tunneltest.TCPPair(t)
		sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{})
		go func() {
			far.Write([]byte("hello pod"))
			far.CloseWrite()
		}()
		got, err := io.ReadAll(pod)
		if err != nil || string(got) != "hello pod" {
			t.Fatalf("pod read %q, %v", got, err)
		}
		pod.Write([]byte("bye"))
		pod.CloseWrite()
		back, err := io.ReadAll(far)
		if err != nil || string(back) != "bye" {
			t.Fatalf("far read %q, %v; want bye and a clean EOF", back, err)
		}
		sp.wait(t, 5*time.Second)
		if sp.err != nil || sp.stats != (tunnel.SpliceStats{AToB: 3, BToA: 9}) {
			t.Errorf("SpliceAsync = %+v, %v; want 3/9 bytes and a clean end", sp.stats, sp.err)
		}
		if agent.Aborted() {
			t.Error("pod connection aborted after a clean end")
		}
	})
	t.Run("pod end without half-close closes all", func(t *testing.T) {
		leakCheck(t)
		agent, pod := tunneltest.ReadyPipe()
		b, far := net.Pipe() // no CloseWrite: the EOF can only be passed on by closing
		sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{})
		pod.CloseWrite()
		sp.wait(t, 5*time.Second)
		if sp.err != nil {
			t.Errorf("SpliceAsync = %v, want a clean end", sp.err)
		}
		if _, err := far.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("far read %v, want io.EOF", err)
		}
		if agent.Aborted() {
			t.Error("pod connection aborted after a clean end")
		}
		pod.Close()
	})
}

// TestSpliceAsyncIdleTimeout: the pod's bytes keep the idle timeout off;
// silence then ends the splice with ErrIdleTimeout and aborts both sides,
// although no goroutine was running for the pod's direction.
func TestSpliceAsyncIdleTimeout(t *testing.T) {
	leakCheck(t)
	const idle = 300 * time.Millisecond
	agent, pod := tunneltest.ReadyPipe()
	b, far := tunneltest.TCPPair(t)
	go io.Copy(io.Discard, far)
	start := time.Now()
	sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{IdleTimeout: idle})
	var last time.Time
	for range 40 { // 4 idle timeouts of traffic
		if _, err := pod.Write([]byte("tick")); err != nil {
			t.Fatal(err)
		}
		last = time.Now()
		time.Sleep(idle / 10)
	}
	select {
	case <-sp.done:
		t.Fatalf("splice ended while the pod sent: %v", sp.err)
	default:
	}
	sp.wait(t, 5*time.Second)
	if !errors.Is(sp.err, tunnel.ErrIdleTimeout) || sp.stats.AToB != 160 {
		t.Errorf("SpliceAsync = %+v, %v; want 160 bytes and ErrIdleTimeout", sp.stats, sp.err)
	}
	if d := time.Since(last); d < idle {
		t.Errorf("timed out %v after the last byte, want at least %v", d, idle)
	}
	if time.Since(start) < 4*idle {
		t.Errorf("ended after %v, before the traffic (%v) and the idle timeout", time.Since(start), 4*idle)
	}
	if !agent.Aborted() {
		t.Error("pod connection not aborted on the idle timeout")
	}
}

// TestSpliceAsyncBadStart: done is called at once, on the caller's
// goroutine, when the splice cannot start; the connections are closed.
func TestSpliceAsyncBadStart(t *testing.T) {
	leakCheck(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	agent, pod := tunneltest.ReadyPipe()
	b, far := tunneltest.TCPPair(t)
	sp := startAsync(ctx, agent, b, tunnel.SpliceOptions{})
	select {
	case <-sp.done:
	default:
		t.Fatal("done not called before SpliceAsync returned")
	}
	if !errors.Is(sp.err, context.Canceled) {
		t.Errorf("SpliceAsync = %v, want context.Canceled", sp.err)
	}
	if !agent.Aborted() {
		t.Error("pod connection not aborted")
	}
	checkAborted(t, "tcp", far)
	pod.Close()

	sp = startAsync(t.Context(), nil, b, tunnel.SpliceOptions{})
	if sp.err == nil {
		t.Error("SpliceAsync with a nil conn: no error")
	}
	a2, _ := tunneltest.ReadyPipe()
	b2, _ := tunneltest.Pipe()
	sp = startAsync(t.Context(), a2, b2, tunnel.SpliceOptions{IdleTimeout: -1})
	if sp.err == nil {
		t.Error("SpliceAsync with a negative idle timeout: no error")
	}
}

// TestSpliceAsyncBufferSize: a non-default buffer size moves bulk data
// in order too.
func TestSpliceAsyncBufferSize(t *testing.T) {
	leakCheck(t)
	agent, pod := tunneltest.ReadyPipe()
	b, far := tunneltest.Pipe()
	sp := startAsync(t.Context(), agent, b, tunnel.SpliceOptions{BufferSize: 1000})
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	go func() {
		for off := 0; off < len(data); off += 3333 {
			pod.Write(data[off:min(off+3333, len(data))])
		}
		pod.CloseWrite()
	}()
	got, err := io.ReadAll(far)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("far read %d bytes, %v; want %d in order", len(got), err, len(data))
	}
	far.CloseWrite()
	sp.wait(t, 5*time.Second)
	if sp.err != nil || sp.stats.AToB != int64(len(data)) {
		t.Errorf("SpliceAsync = %+v, %v", sp.stats, sp.err)
	}
	pod.Close()
}

// TestSpliceAsyncNoCopyBeforeFirstBytes: a pod connection that can tell it
// has nothing yet (ReadReady) gets no copy goroutine when the splice
// starts, only when its first bytes come; one that already has bytes gets
// its copy at once. Both deliver everything and end cleanly.
func TestSpliceAsyncNoCopyBeforeFirstBytes(t *testing.T) {
	for _, early := range []bool{false, true} {
		name := "nothing yet"
		if early {
			name = "bytes already buffered"
		}
		t.Run(name, func(t *testing.T) {
			leakCheck(t)
			agent, pod := tunneltest.ReadyPipe()
			b, far := tunneltest.Pipe()
			var spawned atomic.Int32
			opts := tunnel.SpliceOptions{Go: func(f func()) { spawned.Add(1); go f() }}
			if early {
				if _, err := pod.Write([]byte("early")); err != nil {
					t.Fatal(err)
				}
			}
			sp := startAsync(t.Context(), agent, b, opts)
			want := int32(0)
			if early {
				want = 1
			}
			if got := spawned.Load(); got != want {
				t.Fatalf("%d copies started with the splice, want %d", got, want)
			}
			msg := "early"
			if !early {
				msg = "first bytes"
				if _, err := pod.Write([]byte(msg)); err != nil {
					t.Fatal(err)
				}
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(far, buf); err != nil || string(buf) != msg {
				t.Fatalf("far end read %q, %v; want %q", buf, err, msg)
			}
			if got := spawned.Load(); got < 1 {
				t.Fatal("bytes moved, but no copy was started")
			}
			pod.CloseWrite()
			if _, err := far.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("far end after the pod's FIN: %v, want io.EOF", err)
			}
			far.CloseWrite()
			sp.wait(t, 5*time.Second)
			if sp.err != nil {
				t.Errorf("splice ended with %v, want a clean end", sp.err)
			}
			if sp.stats.AToB != int64(len(msg)) {
				t.Errorf("stats %+v, want %d bytes from the pod", sp.stats, len(msg))
			}
			pod.Close()
			far.Close()
		})
	}
}
