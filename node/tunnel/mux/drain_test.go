package mux_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

var errWouldBlock = errors.New("test sink: full")

// trySink is a pod's socket as DrainAsync sees a netstack.Conn: a send
// buffer of limit bytes that TryWrite fills without waiting and Write
// waits on; take is the pod reading. It fails the test if two writers
// ever overlap.
type trySink struct {
	t       *testing.T
	mu      sync.Mutex
	cond    *sync.Cond
	limit   int
	held    int    // in the buffer, not taken yet
	got     []byte // everything written, in order
	closed  bool
	tries   int // TryWrite calls that took bytes
	writes  int // Write calls
	writing atomic.Int32
}

func newTrySink(t *testing.T, limit int) *trySink {
	k := &trySink{t: t, limit: limit}
	k.cond = sync.NewCond(&k.mu)
	return k
}

func (k *trySink) enter() func() {
	if k.writing.Add(1) != 1 {
		k.t.Error("two writers on the sink at once")
	}
	return func() { k.writing.Add(-1) }
}

func (k *trySink) TryWrite(p []byte) (int, error) {
	defer k.enter()()
	k.mu.Lock()
	defer k.mu.Unlock()
	n := min(len(p), k.limit-k.held)
	if n <= 0 {
		return 0, errWouldBlock
	}
	k.tries++
	k.held += n
	k.got = append(k.got, p[:n]...)
	k.cond.Broadcast()
	return n, nil
}

func (k *trySink) Write(p []byte) (int, error) {
	defer k.enter()()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.writes++
	written := 0
	for len(p) > 0 {
		for k.held >= k.limit && !k.closed {
			k.cond.Wait()
		}
		if k.closed {
			return written, io.ErrClosedPipe
		}
		n := min(len(p), k.limit-k.held)
		k.held += n
		k.got = append(k.got, p[:n]...)
		k.cond.Broadcast()
		written += n
		p = p[n:]
	}
	return written, nil
}

// setLimit changes the buffer size (0: the pod stalls).
func (k *trySink) setLimit(n int) {
	k.mu.Lock()
	k.limit = n
	k.cond.Broadcast()
	k.mu.Unlock()
}

// take is the pod reading everything buffered.
func (k *trySink) take() {
	k.mu.Lock()
	k.held = 0
	k.cond.Broadcast()
	k.mu.Unlock()
}

func (k *trySink) close() {
	k.mu.Lock()
	k.closed = true
	k.cond.Broadcast()
	k.mu.Unlock()
}

func (k *trySink) len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.got)
}

func (k *trySink) bytes() []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]byte(nil), k.got...)
}

// drained is a server stream draining into its sink, with what DrainAsync
// reported.
type drained struct {
	st    *mux.Stream
	sink  *trySink
	moved atomic.Int64
	done  chan error
}

// drainServer returns a client session whose server drains every
// accepted stream into a sink made by mk (keyed by the stream's payload),
// and the channel the drained streams arrive on.
func drainServer(t *testing.T, mk func(payload []byte) *trySink) (*mux.Session, chan *drained) {
	streams := make(chan *drained, 16)
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		if err := st.Accept(); err != nil {
			t.Error(err)
			return
		}
		d := &drained{st: st, sink: mk(st.Payload()), done: make(chan error, 1)}
		st.DrainAsync(d.sink, func(n int) { d.moved.Add(int64(n)) }, func(err error) { d.done <- err })
		streams <- d
		err := <-d.done
		d.done <- err // for the test
		d.sink.close()
		st.Close()
	})
	return client, streams
}

// openReplied opens a stream and waits for its Accept (the Open is
// corked until then).
func openReplied(t *testing.T, client *mux.Session, payload []byte) *mux.Stream {
	t.Helper()
	st, err := client.OpenStream(payload, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WaitReply(t.Context()); err != nil {
		t.Fatal(err)
	}
	return st
}

func waitDone(t *testing.T, d *drained) error {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("drain did not end")
		return nil
	}
}

// TestDrainAsyncInline: small messages to a sink with room are written by
// the session's reader itself: no drainer goroutine is started until the
// End has to be passed on, and done reports the clean end after the bytes.
func TestDrainAsyncInline(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func([]byte) *trySink { return newTrySink(t, 1<<20) })
	st := openReplied(t, client, hdr)
	d := <-streams
	before := mux.DrainersStarted()
	msg := bytes.Repeat([]byte("x"), 1024)
	for i := range 100 {
		if _, err := st.Write(msg); err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool { return d.sink.len() == (i+1)*len(msg) })
	}
	if n := mux.DrainersStarted() - before; n != 0 {
		t.Errorf("%d drainer goroutines started for 100 small messages to a sink with room, want 0", n)
	}
	d.sink.mu.Lock()
	tries, writes := d.sink.tries, d.sink.writes
	d.sink.mu.Unlock()
	if tries != 100 || writes != 0 {
		t.Errorf("sink saw %d TryWrites and %d Writes, want 100 and 0", tries, writes)
	}
	if got := d.moved.Load(); got != 100*1024 {
		t.Errorf("moved reported %d bytes, want %d", got, 100*1024)
	}
	st.CloseWrite()
	if err := waitDone(t, d); err != nil {
		t.Errorf("done after End: %v, want nil", err)
	}
	io.Copy(io.Discard, st)
	st.Close()
}

// openWithFirst opens a stream and writes first, which leaves with the
// Open: the server has it queued before its handler attaches a sink.
func openWithFirst(t *testing.T, client *mux.Session, first []byte) *mux.Stream {
	t.Helper()
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write(first); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestDrainAsyncFirstBytesByCaller: bytes that arrived before DrainAsync
// (a stream's first data, sent with its Open) are written by DrainAsync's
// caller as far as the sink takes them without waiting, so the request
// reaches the pod without a drainer to schedule; what the sink does not
// take is left to the drainer, in order.
func TestDrainAsyncFirstBytesByCaller(t *testing.T) {
	for _, tc := range []struct {
		name        string
		limit       int
		wantInline  int
		wantDrainer bool
	}{
		{"sink with room", 1 << 20, 3000, false},
		{"sink takes part", 1000, 1000, true},
		{"sink full", 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			first := make([]byte, 3000)
			for i := range first {
				first[i] = byte(i % 251)
			}
			type result struct {
				inline   int
				drainers int64
			}
			results := make(chan result, 1)
			d := &drained{sink: newTrySink(t, tc.limit), done: make(chan error, 1)}
			client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
				if err := st.Accept(); err != nil {
					t.Error(err)
					return
				}
				waitFor(t, func() bool { return st.Queued() == len(first) })
				before := mux.DrainersStarted()
				st.DrainAsync(d.sink, func(n int) { d.moved.Add(int64(n)) }, func(err error) { d.done <- err })
				results <- result{d.sink.len(), mux.DrainersStarted() - before}
				err := <-d.done
				d.done <- err
				d.sink.close()
				st.Close()
			})
			st := openWithFirst(t, client, first)
			r := <-results
			if r.inline != tc.wantInline {
				t.Errorf("sink held %d bytes when DrainAsync returned, want %d", r.inline, tc.wantInline)
			}
			if (r.drainers > 0) != tc.wantDrainer {
				t.Errorf("DrainAsync started %d drainers, want a drainer: %v", r.drainers, tc.wantDrainer)
			}
			d.sink.setLimit(1 << 20)
			waitFor(t, func() bool { return d.sink.len() == len(first) })
			if got := d.sink.bytes(); !bytes.Equal(got, first) {
				t.Error("the sink got other bytes, or another order, than were sent")
			}
			if got := d.moved.Load(); got != int64(len(first)) {
				t.Errorf("moved reported %d bytes, want %d", got, len(first))
			}
			st.CloseWrite()
			if err := waitDone(t, d); err != nil {
				t.Errorf("done after End: %v, want nil", err)
			}
			io.Copy(io.Discard, st)
			st.Close()
		})
	}
}

// hookSink is a trySink whose first TryWrite runs hook before it takes
// anything.
type hookSink struct {
	*trySink
	once sync.Once
	hook func()
}

func (h *hookSink) TryWrite(p []byte) (int, error) {
	h.once.Do(h.hook)
	return h.trySink.TryWrite(p)
}

// TestDrainAsyncFirstBytesCutMeanwhile: a stream reset while DrainAsync's
// caller writes its first bytes (and the pod takes only part of them)
// drops the rest, as a reset drops everything queued: no drainer is left
// writing them into a pod that does not read, and the end is reported at
// once.
func TestDrainAsyncFirstBytesCutMeanwhile(t *testing.T) {
	leakCheck(t)
	first := bytes.Repeat([]byte("r"), 3000)
	clientSt := make(chan *mux.Stream, 1)
	ended := make(chan error, 1)
	var sink *hookSink
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		if err := st.Accept(); err != nil {
			t.Error(err)
			return
		}
		waitFor(t, func() bool { return st.Queued() == len(first) })
		sink = &hookSink{trySink: newTrySink(t, 1000), hook: func() {
			(<-clientSt).Abort() // the client resets the stream now
			select {
			case <-st.Context().Done():
			case <-time.After(5 * time.Second):
				t.Error("the reset did not reach the server's stream")
			}
		}}
		st.DrainAsync(sink, func(int) {}, func(err error) { ended <- err })
		select {
		case err := <-ended:
			if err == nil {
				t.Error("done after a reset: nil, want an error")
			}
		case <-time.After(5 * time.Second):
			t.Error("done not called within 5s of the reset (a drainer is stuck writing dropped bytes)")
		}
		sink.mu.Lock()
		if sink.writes != 0 || len(sink.got) != 1000 {
			t.Errorf("after the reset the sink saw %d blocking writes and holds %d bytes, want 0 and the 1000 taken before it", sink.writes, len(sink.got))
		}
		sink.mu.Unlock()
		sink.close()
		st.Close()
	})
	st := openWithFirst(t, client, first)
	clientSt <- st
	io.Copy(io.Discard, st)
}

// TestDrainAsyncBulkGoesToTheDrainer: full-size Data frames (bulk
// transfer) are never written by the session's reader: the drainer is the
// pipeline stage that overlaps the pod side with the next record's
// decryption. Every byte arrives, in order.
func TestDrainAsyncBulkGoesToTheDrainer(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func([]byte) *trySink { return newTrySink(t, 8<<20) })
	st := openReplied(t, client, hdr)
	d := <-streams
	msg := make([]byte, mux.MaxPayload)
	for i := range msg {
		msg[i] = byte(i % 251)
	}
	const n = 20
	for range n {
		if _, err := st.Write(msg); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return d.sink.len() == n*len(msg) })
	d.sink.mu.Lock()
	tries := d.sink.tries
	got := bytes.Clone(d.sink.got)
	d.sink.mu.Unlock()
	if tries != 0 {
		t.Errorf("sink saw %d TryWrites for full-size frames, want 0 (bulk goes to the drainer)", tries)
	}
	if !bytes.Equal(got, bytes.Repeat(msg, n)) {
		t.Error("bytes differ from what was sent")
	}
	st.CloseWrite()
	if err := waitDone(t, d); err != nil {
		t.Errorf("done after End: %v, want nil", err)
	}
	io.Copy(io.Discard, st)
	st.Close()
}

// TestDrainAsyncStalledSinkNoHeadOfLine: a stream whose sink does not
// take bytes (TryWrite would block, Write waits) fills its own window and
// no more; the reader does not wait for it, and another stream of the
// connection keeps delivering. Released, the stalled stream delivers
// everything, in order.
func TestDrainAsyncStalledSinkNoHeadOfLine(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func(p []byte) *trySink {
		if string(p) == "stall" {
			return newTrySink(t, 0)
		}
		return newTrySink(t, 1<<20)
	})
	slow := openReplied(t, client, []byte("stall"))
	ds := <-streams
	data := make([]byte, 2*mux.StreamWindow)
	for i := range data {
		data[i] = byte(i % 251)
	}
	wrote := make(chan int, 1)
	go func() {
		slow.SetWriteDeadline(time.Now().Add(2 * time.Second))
		n, _ := slow.Write(data)
		wrote <- n
	}()
	fast := openReplied(t, client, hdr)
	df := <-streams
	msg := make([]byte, 1024)
	start := time.Now()
	for i := range 100 {
		if _, err := fast.Write(msg); err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool { return df.sink.len() == (i+1)*len(msg) })
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("100 messages took %v next to a stalled stream", d)
	}
	n := <-wrote
	if n != mux.StreamWindow {
		t.Errorf("stalled stream took %d bytes, want exactly its window %d", n, mux.StreamWindow)
	}
	ds.sink.setLimit(64 << 10)
	go func() {
		for ds.sink.len() < n {
			ds.sink.take()
			time.Sleep(time.Millisecond)
		}
		ds.sink.take()
	}()
	waitFor(t, func() bool { return ds.sink.len() == n })
	if !bytes.Equal(ds.sink.bytes(), data[:n]) {
		t.Error("the stalled stream's bytes arrived changed or out of order")
	}
	fast.CloseWrite()
	slow.CloseWrite()
	waitDone(t, df)
	waitDone(t, ds)
	fast.Close()
	slow.Close()
}

// TestDrainAsyncOrderAcrossSwitches: the sink alternates between room
// (inline writes) and full (queued bytes, a drainer), with messages of
// every size; the bytes arrive complete and in order, both paths were
// taken, and the End arrives after the last byte.
func TestDrainAsyncOrderAcrossSwitches(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func([]byte) *trySink { return newTrySink(t, 8<<10) })
	st := openReplied(t, client, hdr)
	d := <-streams
	var want []byte
	stop := make(chan struct{})
	podDone := make(chan struct{})
	go func() { // the pod reads in bursts, with pauses
		defer close(podDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(i%3) * time.Millisecond):
			}
			d.sink.take()
		}
	}()
	drainers := mux.DrainersStarted()
	sizes := []int{1, 100, 1024, 7000, 20000, 3, 9000, 64 << 10, 500}
	for i := range 300 {
		msg := make([]byte, sizes[i%len(sizes)])
		for j := range msg {
			msg[j] = byte(i + j)
		}
		want = append(want, msg...)
		if _, err := st.Write(msg); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			// Let the sink catch up now and then, so later messages go
			// inline again.
			waitFor(t, func() bool { return d.sink.len() == len(want) })
		}
	}
	st.CloseWrite()
	if err := waitDone(t, d); err != nil {
		t.Errorf("done: %v, want nil", err)
	}
	close(stop)
	<-podDone
	// done came after the last byte: the sink holds all of them.
	got := d.sink.bytes()
	if !bytes.Equal(got, want) {
		t.Fatalf("sink got %d bytes, want %d, or other bytes / order", len(got), len(want))
	}
	if d.moved.Load() != int64(len(want)) {
		t.Errorf("moved reported %d bytes, want %d", d.moved.Load(), len(want))
	}
	d.sink.mu.Lock()
	tries, writes := d.sink.tries, d.sink.writes
	d.sink.mu.Unlock()
	t.Logf("%d inline writes, %d drainer writes, %d drainers", tries, writes, mux.DrainersStarted()-drainers)
	if tries == 0 || writes == 0 {
		t.Errorf("inline writes %d, drainer writes %d: want both paths taken", tries, writes)
	}
	io.Copy(io.Discard, st)
	st.Close()
}

// TestDrainAsyncEndAfterQueued: the End of a stream whose bytes are
// queued behind a full sink is reported only after all of them were
// written.
func TestDrainAsyncEndAfterQueued(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func([]byte) *trySink { return newTrySink(t, 0) })
	st := openReplied(t, client, hdr)
	d := <-streams
	data := bytes.Repeat([]byte("0123456789"), 10000)
	if _, err := st.Write(data); err != nil {
		t.Fatal(err)
	}
	st.CloseWrite()
	select {
	case err := <-d.done:
		t.Fatalf("done (%v) before the queued bytes were written", err)
	case <-time.After(100 * time.Millisecond):
	}
	d.sink.setLimit(4 << 10)
	for {
		select {
		case err := <-d.done:
			if err != nil {
				t.Errorf("done: %v, want nil", err)
			}
			if got := d.sink.bytes(); !bytes.Equal(got, data) {
				t.Errorf("done with %d of %d bytes written", len(got), len(data))
			}
			io.Copy(io.Discard, st)
			st.Close()
			return
		case <-time.After(time.Millisecond):
			d.sink.take()
		}
	}
}

// TestDrainAsyncResetAborts: a Reset while bytes are queued behind a
// stalled sink drops them and reports the reset (an abort, not a clean
// end) once the sink lets the drainer go.
func TestDrainAsyncResetAborts(t *testing.T) {
	leakCheck(t)
	client, streams := drainServer(t, func([]byte) *trySink { return newTrySink(t, 1024) })
	st := openReplied(t, client, hdr)
	d := <-streams
	if _, err := st.Write(make([]byte, 100<<10)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return d.sink.len() == 1024 }) // the rest is queued
	st.Abort()
	time.Sleep(50 * time.Millisecond) // the Reset arrives while the drainer waits
	d.sink.setLimit(1 << 20)
	err := waitDone(t, d)
	if !errors.Is(err, tunnel.ErrPeerReset) {
		t.Errorf("done after a Reset: %v, want tunnel.ErrPeerReset", err)
	}
	if n := d.sink.len(); n >= 100<<10 {
		t.Errorf("all %d bytes were written despite the Reset", n)
	}
}

// spliced runs tunnel.Splice(stream, pod) on the server side of each
// stream, as the inbound agent does, and hands the test the pod's end
// and, later, what Splice returned.
type spliced struct {
	pod   net.Conn
	stats tunnel.SpliceStats
	err   error
	done  chan struct{}
}

func spliceServer(t *testing.T, ctx context.Context, opts tunnel.SpliceOptions) (*mux.Session, chan *spliced) {
	out := make(chan *spliced, 4)
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		agentSide, pod := tunneltest.Pipe()
		sp := &spliced{pod: pod, done: make(chan struct{})}
		out <- sp
		sp.stats, sp.err = tunnel.Splice(ctx, st, agentSide, opts)
		close(sp.done)
	})
	return client, out
}

func waitSplice(t *testing.T, sp *spliced) {
	t.Helper()
	select {
	case <-sp.done:
	case <-time.After(5 * time.Second):
		t.Fatal("splice did not return")
	}
}

// TestSpliceDrainsStreamItself: Splice over a stream (the stream drains
// itself, no copy routine) keeps Splice's contract: half-close both
// ways, exact stats, an idle timeout that traffic keeps off and that
// then resets the stream, and a cancelled context that ends it.
func TestSpliceDrainsStreamItself(t *testing.T) {
	leakCheck(t)
	t.Run("clean", func(t *testing.T) {
		client, out := spliceServer(t, context.Background(), tunnel.SpliceOptions{})
		st := openReplied(t, client, hdr)
		sp := <-out
		up := bytes.Repeat([]byte("u"), 300<<10)
		go func() { st.Write(up); st.CloseWrite() }()
		got, err := io.ReadAll(sp.pod)
		if err != nil || !bytes.Equal(got, up) {
			t.Fatalf("pod read %d bytes, %v; want %d, EOF", len(got), err, len(up))
		}
		down := bytes.Repeat([]byte("d"), 70<<10)
		go func() { sp.pod.Write(down); sp.pod.(*tunneltest.Conn).CloseWrite() }()
		back, err := io.ReadAll(st)
		if err != nil || !bytes.Equal(back, down) {
			t.Fatalf("client read %d bytes, %v; want %d, EOF", len(back), err, len(down))
		}
		waitSplice(t, sp)
		if sp.err != nil {
			t.Errorf("splice: %v", sp.err)
		}
		if sp.stats.AToB != int64(len(up)) || sp.stats.BToA != int64(len(down)) {
			t.Errorf("stats %+v, want AToB %d BToA %d", sp.stats, len(up), len(down))
		}
		st.Close()
	})
	t.Run("idle", func(t *testing.T) {
		client, out := spliceServer(t, context.Background(), tunnel.SpliceOptions{IdleTimeout: 300 * time.Millisecond})
		st := openReplied(t, client, hdr)
		sp := <-out
		go io.Copy(io.Discard, sp.pod)
		for range 8 { // 800 ms of traffic towards the pod only
			if _, err := st.Write([]byte("tick")); err != nil {
				t.Fatalf("write while traffic flows: %v", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		select {
		case <-sp.done:
			t.Fatalf("splice ended while bytes flowed: %v", sp.err)
		default:
		}
		waitSplice(t, sp)
		if !errors.Is(sp.err, tunnel.ErrIdleTimeout) {
			t.Errorf("splice: %v, want ErrIdleTimeout", sp.err)
		}
		if _, err := io.ReadAll(st); !errors.Is(err, tunnel.ErrPeerReset) {
			t.Errorf("client read after the idle timeout: %v, want a reset", err)
		}
		st.Close()
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		client, out := spliceServer(t, ctx, tunnel.SpliceOptions{})
		st := openReplied(t, client, hdr)
		sp := <-out
		cancel()
		waitSplice(t, sp)
		if !errors.Is(sp.err, context.Canceled) {
			t.Errorf("splice: %v, want context.Canceled", sp.err)
		}
		if _, err := io.ReadAll(st); !errors.Is(err, tunnel.ErrPeerReset) {
			t.Errorf("client read after the cancel: %v, want a reset", err)
		}
		st.Close()
	})
}
