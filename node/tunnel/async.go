package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Readable is a connection that can be waited on without a goroutine
// parked in Read (*netstack.Conn, a pod's connection in the agent's
// netstack). SpliceAsync copies from it on demand: nothing runs for its
// direction while it has nothing buffered.
//
// NotifyReadable registers f, called whenever the connection may have
// become readable (bytes, the peer's FIN or RST, an error; spurious calls
// are allowed). f is called from the connection's own machinery (gVisor's
// TCP processor goroutine): it does not block and never calls the
// connection. cancel unregisters f; once it returns, no call of f is
// running or will start.
//
// TryRead reads what is buffered without waiting. When nothing is, it
// returns 0 and an error that has a method WouldBlock() bool reporting
// true (netstack.ErrWouldBlock); io.EOF after the peer's clean end; any
// other error is a failure (a reset). It is never called concurrently
// with itself or Read.
type Readable interface {
	NotifyReadable(f func()) (cancel func())
	TryRead(b []byte) (int, error)
}

// wouldBlock reports whether err is TryRead's "nothing buffered".
func wouldBlock(err error) bool {
	var wb interface{ WouldBlock() bool }
	return errors.As(err, &wb) && wb.WouldBlock()
}

// SpliceAsync is Splice without a waiting caller: it starts the splice of
// a and b and returns at once, and done is called once, when both
// directions have ended and both connections are closed, with what Splice
// would have returned. Everything else is Splice's contract (half-close,
// abort vs clean end, ctx, the idle timeout, exact stats).
//
// A direction whose source is an AsyncDrainer (a mux stream) drains
// itself; one whose source is Readable (a netstack connection) is copied
// by a goroutine that exists only while bytes are buffered; any other
// direction gets a goroutine of its own for its whole life, as in Splice.
// So a spliced stream <-> netstack connection that is idle holds no
// goroutine at all, and whoever owns the connection need not park one
// either: it hands its end-of-connection work to done.
//
// done runs on one of the splice's goroutines (or on the caller's, before
// SpliceAsync returns, when the splice could not start: bad arguments, ctx
// already done); it may block, and when it is called no other goroutine
// of the splice is left.
func SpliceAsync(ctx context.Context, a, b net.Conn, opts SpliceOptions, done func(SpliceStats, error)) {
	if done == nil {
		done = func(SpliceStats, error) {}
	}
	s, err := newSplice(ctx, a, b, opts)
	if err != nil {
		done(SpliceStats{}, err)
		return
	}
	if err := ctx.Err(); err != nil {
		abort(a)
		abort(b)
		done(SpliceStats{}, err)
		return
	}
	s.endDone = make(chan struct{})
	s.startAll(ctx, done)
}

// startAll starts both directions of an asynchronous splice. The splice
// completes when three things have reported: both directions and this
// set-up (so that complete never runs before the context hook and the
// idle timer it stops exist).
func (s *splice) startAll(ctx context.Context, done func(SpliceStats, error)) {
	var pending atomic.Int32
	pending.Store(3)
	var stopCtx func() bool
	report := func(res copyResult) {
		if pending.Add(-1) != 0 {
			return
		}
		// Last one out: every direction ended, set-up is over.
		stopCtx()
		s.mu.Lock()
		s.finished = true
		if s.idleTimer != nil {
			s.idleTimer.Stop()
		}
		s.mu.Unlock()
		s.end(nil)  // both ended with EOF, passed on as half-closes (or end ran)
		<-s.endDone // whoever ran end has closed both connections
		s.mu.Lock()
		stats, err := SpliceStats{AToB: s.aToB.Load(), BToA: s.bToA.Load()}, s.firstErr
		s.mu.Unlock()
		done(stats, err)
	}

	type direction struct {
		name     string
		dst, src net.Conn
		n        *atomic.Int64
	}
	dirs := [2]direction{{"a->b", s.b, s.a, &s.aToB}, {"b->a", s.a, s.b, &s.bToA}}
	// The on-demand copies exist before anything can call end, which
	// wakes them (s.ready is not written again).
	var starts [2]func()
	for i, d := range dirs {
		switch src := d.src.(type) {
		case AsyncDrainer:
			starts[i] = func() { s.startAsync(d.name, d.dst, src, d.n, report) }
		case Readable:
			r := &readyCopy{s: s, dir: d.name, dst: d.dst, src: src, n: d.n, report: report, kick: make(chan struct{}, 1)}
			r.state.Store(copyRunning) // an end before start only leaves pending behind
			s.ready = append(s.ready, r)
			starts[i] = r.start
		default:
			starts[i] = func() { go s.routineCopy(d.name, d.dst, d.src, d.n, report) }
		}
	}
	for _, start := range starts {
		start()
	}
	stopCtx = context.AfterFunc(ctx, func() { s.end(ctx.Err()) })
	if s.idle > 0 {
		s.mu.Lock()
		s.idleTimer = time.AfterFunc(s.idle, s.checkIdle)
		s.mu.Unlock()
	}
	report(copyResult{}) // set-up's share
}

// readyCopy copies one direction from a Readable source on demand: a
// goroutine runs only while the source has bytes buffered (or an end to
// pass on), lingers for copyLinger after a TryRead would block, and then
// exits.
//
// States: idle (no goroutine; the next readable callback starts one) ->
// running (a goroutine is reading) -> pending (running, and a callback
// came meanwhile: read again before going further) -> lingering (the
// goroutine waits for a kick or its timer) -> running (kicked) or idle
// (timer) ... -> ended. Only the callback moves idle -> running and
// lingering -> running, and only the goroutine moves running -> lingering
// and lingering -> idle, so there is never more than one goroutine (the
// order of bytes is kept) and a callback that races with "would block" is
// never lost: it finds the state running and leaves pending behind, or
// lingering and kicks, and the goroutine sees either when it tries to
// move on.
//
// Why linger: a request/response connection's next message comes within a
// round trip. A fresh goroutine for each one costs latency, not CPU: a
// review measured no stack copying, but the new goroutine waited to be
// scheduled (61.8 against 40.3 us per round trip with a parked reader);
// a goroutine that waits a little is woken like the parked reader it
// replaces (40.1 us; BenchmarkRoundTrip in node/tunnel/mux). An idle
// connection still holds none once the linger has passed.
type readyCopy struct {
	s      *splice
	dir    string
	dst    net.Conn
	src    Readable
	n      *atomic.Int64
	report func(copyResult)

	state  atomic.Int32
	cancel func() // unregisters wake; set before the first goroutine starts
	fixed  []byte // the copy buffer when SpliceOptions.BufferSize is not the default

	// kick wakes the lingering goroutine (buffered: wake never blocks; a
	// stale kick only costs a pass). Made with the splice.
	kick chan struct{}
	// timer ends a linger; made by the first one, used only by the
	// goroutine.
	timer *time.Timer
}

const (
	copyIdle int32 = iota
	copyRunning
	copyPending
	copyLingering
	copyEnded
)

// copyLinger is how long an on-demand copy waits for more bytes before
// its goroutine exits (see readyCopy). Tests change it.
var copyLinger = time.Millisecond

// readyProber is a Readable that tells, without reading, whether TryRead
// has something (netstack.Conn.ReadReady).
type readyProber interface{ ReadReady() bool }

// start registers the callback and runs a first pass for bytes already
// buffered. The state is running from the start, so a callback that comes
// before cancel is set only leaves pending behind. A source that can tell
// it has nothing yet (a new connection whose first bytes are still to
// come) gets no goroutine at all: the state goes idle, and the first
// callback starts the copy.
func (r *readyCopy) start() {
	r.cancel = r.src.NotifyReadable(r.wake)
	if p, ok := r.src.(readyProber); ok && !p.ReadReady() && r.state.CompareAndSwap(copyRunning, copyIdle) {
		// A callback after ReadReady finds idle and starts the copy;
		// one before it left pending behind, and the CAS failed.
		return
	}
	r.s.spawn(r.routineCopy)
}

// spawn runs f on SpliceOptions.Go, or in a goroutine of its own.
func (s *splice) spawn(f func()) {
	if s.goFn != nil {
		s.goFn(f)
		return
	}
	go f()
}

// wake is the readable callback (and end's nudge). It never blocks: at
// most it starts the copy goroutine.
func (r *readyCopy) wake() {
	for {
		switch r.state.Load() {
		case copyIdle:
			if r.state.CompareAndSwap(copyIdle, copyRunning) {
				r.s.spawn(r.routineCopy) // owned by the splice: exits at would-block or at the direction's end
				return
			}
		case copyRunning:
			if r.state.CompareAndSwap(copyRunning, copyPending) {
				return
			}
		case copyLingering:
			if r.state.CompareAndSwap(copyLingering, copyRunning) {
				select {
				case r.kick <- struct{}{}:
				default: // a kick is already waiting
				}
				return
			}
		default: // pending already, or ended
			return
		}
	}
}

// routineCopy reads and forwards until the source would block (then it
// exits, unless a callback came meanwhile) or the direction ends (then it
// reports the end).
func (r *readyCopy) routineCopy() {
	for {
		res, ended := r.pass()
		if ended {
			r.state.Store(copyEnded)
			r.cancel()
			res.err = wrapDir(r.dir, res.err)
			r.s.settle(res)
			r.report(res)
			return
		}
		if testBeforeIdle != nil {
			testBeforeIdle() // widens the race below in tests
		}
		linger := copyLinger
		next := copyIdle
		if linger > 0 {
			next = copyLingering
		}
		if !r.state.CompareAndSwap(copyRunning, next) {
			// pending: a callback came after the last TryRead began.
			r.state.Store(copyRunning)
			continue
		}
		if next == copyIdle || !r.linger(linger) {
			return
		}
	}
}

// linger waits, in state lingering, for a kick (then the state is
// running again: it reports true) or for d to pass (then it goes idle
// and reports false, unless a callback came just then).
func (r *readyCopy) linger(d time.Duration) bool {
	if r.timer == nil {
		r.timer = time.NewTimer(d)
	} else {
		r.timer.Reset(d)
	}
	select {
	case <-r.kick:
		r.timer.Stop()
		// Normally wake set running before kicking; a stale kick (from
		// a linger that had already timed out) finds lingering: claim
		// it, a pass costs little.
		r.state.CompareAndSwap(copyLingering, copyRunning)
		return true
	case <-r.timer.C:
		if r.state.CompareAndSwap(copyLingering, copyIdle) {
			return false
		}
		return true // woken just as the timer fired: running again
	}
}

// pass moves what is buffered. ended: the direction is over (EOF passed
// on, an error, or the splice ended meanwhile), with res its end.
// Buffers come from pools and go back before it returns, so an idle
// direction holds none (IdleBufferSize while reads are small,
// DefaultBufferSize once one fills it).
func (r *readyCopy) pass() (res copyResult, ended bool) {
	s := r.s
	var b adaptiveBuf
	if s.bufSize == DefaultBufferSize {
		small := smallPool.Get().(*[]byte)
		defer smallPool.Put(small)
		b = adaptiveBuf{small: *small, adaptive: true}
	} else {
		if r.fixed == nil {
			r.fixed = make([]byte, s.bufSize)
		}
		b = adaptiveBuf{small: r.fixed}
	}
	defer b.release()
	for {
		if s.isEnded() {
			// end closed the connections (and woke us): the direction is
			// over, and why is end's business.
			return copyResult{}, true
		}
		buf := b.buf()
		nr, rerr := r.src.TryRead(buf)
		if nr > 0 {
			if err := s.write(r.dst, buf[:nr], r.n); err != nil {
				return copyResult{err: err}, true
			}
		}
		if res, ended, more := r.readEnd(nr, rerr); !more {
			return res, ended
		}
		b.read(nr)
	}
}

// readEnd interprets a TryRead's result once its bytes are written: more
// means read again; otherwise the pass stops (ended: with the direction's
// end res).
func (r *readyCopy) readEnd(nr int, rerr error) (res copyResult, ended, more bool) {
	switch {
	case rerr == nil && nr == 0:
		// Nothing and no error: as would-block; a callback comes with
		// the next bytes.
		return copyResult{}, false, false
	case rerr == nil:
		return copyResult{}, false, true
	case wouldBlock(rerr):
		return copyResult{}, false, false
	case errors.Is(rerr, io.EOF):
		closeAll, err := r.s.passEOF(r.dst)
		return copyResult{err: err, closeAll: closeAll}, true, false
	}
	return copyResult{err: fmt.Errorf("read: %w", rerr)}, true, false
}

// testBeforeIdle, set by tests only, runs between a pass that found
// nothing and the copy going idle: where a lost wake-up would hide.
var testBeforeIdle func()

var smallPool = sync.Pool{New: func() any {
	b := make([]byte, IdleBufferSize)
	return &b
}}

func wrapDir(dir string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("splice %s: %w", dir, err)
}

// isEnded reports whether end has closed the connections.
func (s *splice) isEnded() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended
}
