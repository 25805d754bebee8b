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

// DefaultBufferSize is the copy buffer per direction when
// SpliceOptions.BufferSize is zero, taken from a pool only while data
// moves (see IdleBufferSize).
const DefaultBufferSize = 64 << 10

// ErrIdleTimeout is returned by Splice when no byte moved in either direction
// for SpliceOptions.IdleTimeout.
var ErrIdleTimeout = errors.New("tunnel: splice idle timeout")

// SpliceOptions tunes Splice. The zero value is ready to use.
type SpliceOptions struct {
	// BufferSize is the size of each direction's copy buffer. Zero means
	// DefaultBufferSize, whose buffers are shared through a sync.Pool and
	// held only while data moves (IdleBufferSize otherwise); other sizes
	// are allocated per call and held throughout.
	BufferSize int
	// IdleTimeout ends the splice with ErrIdleTimeout once no byte has been
	// read or written in either direction for this long. Zero means none.
	IdleTimeout time.Duration
	// Go, if set, starts SpliceAsync's on-demand copies of a Readable
	// source (a worker pool, whose goroutines have grown their stacks
	// already). nil: a goroutine of their own.
	Go func(func())
}

// SpliceStats counts the bytes Splice moved. They are bytes written to the
// destination side, so they are exact even when Splice ends with an error.
type SpliceStats struct {
	AToB int64 // read from a, written to b
	BToA int64 // read from b, written to a
}

// closeWriter is implemented by *net.TCPConn, *net.UnixConn and *tls.Conn.
type closeWriter interface{ CloseWrite() error }

// lingerer is implemented by *net.TCPConn. SetLinger(0) makes Close send a
// reset instead of a FIN.
type lingerer interface{ SetLinger(sec int) error }

// netConner is implemented by *tls.Conn: the connection underneath.
type netConner interface{ NetConn() net.Conn }

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, DefaultBufferSize)
	return &b
}}

// Splice copies a to b and b to a concurrently until both directions have
// ended, then closes both connections. It is the whole life of a tunnelled
// connection once the header exchange is done.
//
// Half-close is preserved: when one side's Read reports io.EOF, the other
// side's write half is closed (CloseWrite, which *net.TCPConn and *tls.Conn
// have) and the opposite direction goes on until it ends too. If the other
// side cannot half-close, closing it entirely is the only way to pass the EOF
// on, so Splice then ends both directions.
//
// Splice ends early, closing both connections, when ctx is done (returning
// ctx.Err()), when the idle timeout passes (ErrIdleTimeout), or when a read,
// write or CloseWrite fails (returning that error, wrapped with the
// direction). An early end is an abort: connections that allow it
// (*net.TCPConn, also underneath a *tls.Conn) are reset rather than closed
// with a FIN, so that the peers see an error rather than a clean end of
// stream, and a reset on one side of the mesh is a reset on the other. No
// close_notify is sent on an aborted *tls.Conn for the same reason. Other
// connections get the same treatment by having SetLinger(int) error (set to
// 0 before Close, as for TCP) or NetConn() net.Conn (aborted underneath);
// a wrapper that hides both is simply closed.
//
// io.EOF is how a direction ends normally; it is never returned, nor is the
// net.ErrClosed of a copy whose connection the splice's own end closed. A
// connection closed by someone else under a running splice is an early
// end like a failed read: both sides are aborted and the error returned.
// Both connections are closed when Splice returns, and none of its
// goroutines outlives the call.
func Splice(ctx context.Context, a, b net.Conn, opts SpliceOptions) (SpliceStats, error) {
	s, err := newSplice(ctx, a, b, opts)
	if err != nil {
		return SpliceStats{}, err
	}
	return s.run(ctx)
}

// newSplice checks Splice's and SpliceAsync's arguments and makes the
// splice. On an error both connections are already closed (aborted when
// they exist but the options are bad).
func newSplice(ctx context.Context, a, b net.Conn, opts SpliceOptions) (*splice, error) {
	if a == nil || b == nil {
		for _, c := range []net.Conn{a, b} {
			if c != nil {
				c.Close()
			}
		}
		return nil, errors.New("splice: nil conn")
	}
	if opts.BufferSize < 0 || opts.IdleTimeout < 0 {
		abort(a)
		abort(b)
		return nil, fmt.Errorf("splice: negative buffer size %d or idle timeout %v", opts.BufferSize, opts.IdleTimeout)
	}
	s := &splice{
		ctx:     ctx,
		a:       a,
		b:       b,
		bufSize: opts.BufferSize,
		idle:    opts.IdleTimeout,
		start:   time.Now(),
		goFn:    opts.Go,
	}
	if s.bufSize == 0 {
		s.bufSize = DefaultBufferSize
	}
	return s, nil
}

// splice is one call of Splice. The calling goroutine owns it: it copies
// a to b itself and starts one routine for b to a (an idle spliced
// connection costs two goroutines, not three), and returns only after
// that routine has ended. When a side is an AsyncDrainer (a mux stream),
// its direction needs no routine: the stream drains itself and reports
// its end on the same channel, and this goroutine copies the other
// direction (an idle spliced stream costs one goroutine). Whoever sees the end first (either copy, the
// context, the idle timer) ends the splice through end, the only place
// that closes the connections.
type splice struct {
	// ctx is the caller's: when it is done, it is why the splice ended,
	// whatever error the closing connections reported first.
	ctx     context.Context
	a, b    net.Conn
	bufSize int
	idle    time.Duration
	start   time.Time
	goFn    func(func()) // SpliceOptions.Go

	// last is when bytes last moved, as nanoseconds since start (monotonic).
	// Only kept when idle > 0.
	last       atomic.Int64
	aToB, bToA atomic.Int64

	mu        sync.Mutex // guards the fields below
	ended     bool       // the connections were closed (by end)
	firstErr  error      // why it ended; nil for a clean end
	finished  bool       // run is returning: the idle timer must not re-arm
	idleTimer *time.Timer

	// ready are SpliceAsync's on-demand copies, woken by end so that they
	// see it (written before either direction starts, then only read).
	ready []*readyCopy
	// endDone (SpliceAsync) is closed once end has closed both connections.
	endDone chan struct{}
}

// copyResult is how a copy reports the end of its direction.
type copyResult struct {
	// err is the direction's error; nil when it ended with EOF.
	err error
	// closeAll: the direction ended with EOF but the destination cannot
	// half-close, so the EOF can only be passed on by closing everything.
	closeAll bool
}

// State: running -> ended (closed by end) -> returned. Once ended, whatever
// the copies report is a consequence of that close and not an error of its
// own.
func (s *splice) run(ctx context.Context) (SpliceStats, error) {
	if err := ctx.Err(); err != nil {
		abort(s.a)
		abort(s.b)
		return SpliceStats{}, err
	}
	done := make(chan copyResult, 1) // buffered: the routine never blocks on it
	report := func(res copyResult) { done <- res }
	// A side that drains itself (a mux stream) needs no goroutine here:
	// this one copies the other direction, and the drained direction
	// reports its end on done.
	dir, dst, src, n := "a->b", s.b, s.a, &s.aToB // this goroutine's direction
	if d, ok := s.b.(AsyncDrainer); ok {
		s.startAsync("b->a", s.a, d, &s.bToA, report)
	} else if d, ok := s.a.(AsyncDrainer); ok {
		s.startAsync("a->b", s.b, d, &s.aToB, report)
		dir, dst, src, n = "b->a", s.a, s.b, &s.bToA
	} else {
		go s.routineCopy("b->a", s.a, s.b, &s.bToA, report)
	}
	stopCtx := context.AfterFunc(ctx, func() { s.end(ctx.Err()) })
	if s.idle > 0 {
		s.mu.Lock()
		s.idleTimer = time.AfterFunc(s.idle, s.checkIdle)
		s.mu.Unlock()
	}
	s.settle(s.copyDir(dir, dst, src, n))
	<-done
	stopCtx()
	s.mu.Lock()
	s.finished = true
	if s.idleTimer != nil {
		s.idleTimer.Stop()
	}
	s.mu.Unlock()
	// Both directions ended with EOF and were passed on as half-closes
	// (or end already ran, and this does nothing).
	s.end(nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	return SpliceStats{AToB: s.aToB.Load(), BToA: s.bToA.Load()}, s.firstErr
}

// settle ends the splice if a direction's end calls for it.
func (s *splice) settle(res copyResult) {
	switch {
	case res.err != nil:
		// A failed read or write ends the splice as an abort, even
		// net.ErrClosed: after the splice's own end it changes nothing
		// (end runs once), and before it someone else closed a
		// connection under the running splice, which may have cut the
		// stream short: the peers must see an abort, never a clean end.
		s.end(res.err)
	case res.closeAll:
		s.end(nil)
	}
}

// end closes both connections once: aborted when err is not nil, closed
// otherwise.
func (s *splice) end(err error) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.ended = true
	if err != nil && s.ctx != nil && s.ctx.Err() != nil {
		// The context's end aborts connections elsewhere too (a stack
		// closing resets its endpoints): a read or write that failed
		// because of it reports the context, as Splice promises.
		err = s.ctx.Err()
	}
	s.firstErr = err
	// Closing happens outside the lock: an abort may write (a mux
	// stream's Reset), and the other direction must not wait for it.
	s.mu.Unlock()
	if err != nil {
		abort(s.a)
		abort(s.b)
	} else {
		s.a.Close()
		s.b.Close()
	}
	// An idle on-demand copy has no goroutine to notice the close.
	for _, r := range s.ready {
		r.wake()
	}
	if s.endDone != nil {
		close(s.endDone)
	}
}

// checkIdle runs on the idle timer: it ends the splice once nothing has
// moved for the idle timeout, and otherwise re-arms.
func (s *splice) checkIdle() {
	idleFor := time.Since(s.start) - time.Duration(s.last.Load())
	if idleFor >= s.idle {
		s.end(ErrIdleTimeout)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.finished {
		s.idleTimer.Reset(s.idle - idleFor)
	}
}

// routineCopy copies one direction, settles its end and reports it. It
// is started by run (or start) and waited for through report.
func (s *splice) routineCopy(dir string, dst, src net.Conn, n *atomic.Int64, report func(copyResult)) {
	res := s.copyDir(dir, dst, src, n)
	s.settle(res) // now: the caller may be blocked in the other direction
	report(res)
}

// copyDir copies one direction until it ends.
func (s *splice) copyDir(dir string, dst, src net.Conn, n *atomic.Int64) copyResult {
	b := adaptiveBuf{small: make([]byte, IdleBufferSize), adaptive: true}
	if s.bufSize != DefaultBufferSize {
		b = adaptiveBuf{small: make([]byte, s.bufSize)}
	}
	closeAll, err := s.copy(dst, src, &b, n)
	if err != nil {
		err = fmt.Errorf("splice %s: %w", dir, err)
	}
	return copyResult{err: err, closeAll: closeAll}
}

// AsyncDrainer is a connection that holds what it receives in buffers of
// its own and writes them out by itself, with no goroutine waiting while
// it is idle (a mux.Stream): DrainAsync returns at once; moved is called
// after each write to w, and done once, from a goroutine that may block,
// when the drain ended: nil at the peer's clean end (after every byte
// before it was written), an error for every other end. An idle spliced
// stream then costs one goroutine, the copy in the other direction.
type AsyncDrainer interface {
	DrainAsync(w io.Writer, moved func(n int), done func(err error))
}

// startAsync drains src into dst through src's own DrainAsync; its end
// is passed on (a half-close, or settled) and reported on done, as
// routineCopy does.
func (s *splice) startAsync(dir string, dst net.Conn, src AsyncDrainer, n *atomic.Int64, report func(copyResult)) {
	src.DrainAsync(dst, func(k int) { n.Add(int64(k)); s.touch() }, func(err error) {
		var res copyResult
		if err == nil {
			res.closeAll, res.err = s.passEOF(dst)
		} else {
			res.err = err
		}
		if res.err != nil {
			res.err = fmt.Errorf("splice %s: %w", dir, res.err)
		}
		s.settle(res)
		report(res)
	})
}

// IdleBufferSize is the buffer a default Splice reads into while a
// direction is quiet. Only when a read fills it (more data is likely
// waiting) does the direction take a DefaultBufferSize buffer from the
// pool, and it gives it back at the first short read, before the read that
// may block: an idle connection holds 2 x IdleBufferSize, not
// 2 x DefaultBufferSize, and a busy one still moves large chunks.
const IdleBufferSize = 2 << 10

// adaptiveBuf is a direction's copy buffer. An adaptive one is the
// idle/busy switch described at IdleBufferSize: small while reads are
// short, a pooled DefaultBufferSize buffer from the read that fills small
// until the first short read. Otherwise it is small, always.
type adaptiveBuf struct {
	small    []byte
	big      *[]byte
	adaptive bool
}

// buf is the buffer for the next read.
func (b *adaptiveBuf) buf() []byte {
	if b.big != nil {
		return *b.big
	}
	return b.small
}

// read adapts to a read of n bytes into buf().
func (b *adaptiveBuf) read(n int) {
	switch {
	case !b.adaptive:
	case b.big == nil && n == len(b.small):
		b.big = bufPool.Get().(*[]byte)
	case b.big != nil && n < len(*b.big):
		b.release()
	}
}

// release gives the big buffer back to the pool.
func (b *adaptiveBuf) release() {
	if b.big != nil {
		bufPool.Put(b.big)
		b.big = nil
	}
}

// copy moves bytes from src to dst until src ends. Unlike io.CopyBuffer it
// never hands the work to ReadFrom/WriteTo, which would bypass the byte
// counts and the idle clock.
func (s *splice) copy(dst, src net.Conn, b *adaptiveBuf, n *atomic.Int64) (closeAll bool, err error) {
	defer b.release()
	for {
		buf := b.buf()
		nr, rerr := src.Read(buf)
		if nr > 0 {
			if err := s.write(dst, buf[:nr], n); err != nil {
				return false, err
			}
		}
		switch {
		case rerr == nil:
		case errors.Is(rerr, io.EOF):
			return s.passEOF(dst)
		default:
			return false, fmt.Errorf("read: %w", rerr)
		}
		b.read(nr)
	}
}

// write writes b to dst, counting and touching the idle clock.
func (s *splice) write(dst net.Conn, b []byte, n *atomic.Int64) error {
	s.touch()
	nw, werr := dst.Write(b)
	if nw > 0 {
		n.Add(int64(nw))
		s.touch()
	}
	if werr != nil {
		return fmt.Errorf("write: %w", werr)
	}
	if nw != len(b) {
		return fmt.Errorf("write: %w", io.ErrShortWrite)
	}
	return nil
}

// passEOF passes a direction's end on to dst: a half-close, or, when dst
// cannot half-close, the signal to close everything.
func (s *splice) passEOF(dst net.Conn) (closeAll bool, err error) {
	if s.isEnded() {
		// The EOF is end's own doing (it closed the source): the splice
		// was cut, and a cut must never reach the other side as a clean
		// end. end is already aborting dst.
		return false, nil
	}
	cw, ok := dst.(closeWriter)
	if !ok {
		return true, nil
	}
	switch err := cw.CloseWrite(); {
	case errors.Is(err, errors.ErrUnsupported):
		return true, nil // a wrapper whose connection cannot half-close
	case err != nil:
		return false, fmt.Errorf("close write: %w", err)
	}
	return false, nil
}

// touch records that bytes moved, for the idle timeout.
func (s *splice) touch() {
	if s.idle > 0 {
		s.last.Store(int64(time.Since(s.start)))
	}
}

// abort closes c so that its peer sees an error, not an end of stream: a TCP
// connection is reset, and a TLS connection is closed underneath, without a
// close_notify alert. Closing underneath first also means a *tls.Conn's Close
// cannot block sending that alert to a peer that does not read.
func abort(c net.Conn) {
	// A connection that knows how to tell its peer it was cut (a
	// FramedConn's Reset frame, a netstack connection's RST) does so.
	if a, ok := c.(interface{ Abort() }); ok {
		a.Abort()
		return
	}
	if u, ok := c.(netConner); ok {
		if inner := u.NetConn(); inner != nil {
			abort(inner)
		}
	}
	if l, ok := c.(lingerer); ok {
		l.SetLinger(0)
	}
	c.Close()
}
