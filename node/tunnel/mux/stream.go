package mux

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

// Stream is one pod connection carried by a Session. It is a net.Conn
// with CloseWrite (sends End: a clean end of this direction) and Abort
// (sends Reset: the stream was cut), like tunnel.FramedConn, so the same
// Splice carries it. An idle stream holds no buffer: received bytes wait
// in pooled chunks only until they are read.
//
// One goroutine may Read (or DrainTo, or the stream drains itself after
// DrainAsync) while another Writes; Abort and Close may be called at any
// time.
type Stream struct {
	s       *Session
	id      uint32
	payload []byte    // server: the Open frame's payload
	opened  time.Time // when it was opened (client) or received (server)
	ctx     context.Context
	cancel  context.CancelFunc // server: ends ctx (the stream was cut, or its handler returned)

	readable chan struct{} // signalled when queue or readErr change
	replyCh  chan struct{} // client: closed when the reply arrived
	rd, wd   deadline

	// Guarded by s.mu.
	queue       []*chunk // received, unread bytes
	off         int      // bytes of queue[0] already read
	queued      int      // unread bytes in queue
	readErr     error    // how the read side ended (io.EOF: the peer's End)
	writeErr    error    // why writes fail (reset, cut, refused)
	replied     bool     // the reply was received (client) or sent (server)
	corked      bool     // client: the Open is queued but not flushed yet
	gotEnd      bool
	sentEnd     bool
	sentReset   bool
	recvWin     int64
	recvUnacked int64
	sendWin     int64
	winCh       chan struct{} // made by a writer waiting for window; closed on growth
	replyTimer  *time.Timer   // client: cuts the stream if no reply comes
	holds       int           // server: its handler and its Holds not released yet

	// The on-demand drain (DrainAsync), guarded by s.mu.
	sink      io.Writer
	sinkTry   tryWriter // sink's non-blocking write, nil if it has none
	sinkMoved func(int)
	sinkDone  func(error)
	sinkBusy  bool // a writer owns the sink: routineRead inline, or the drainer
	sinkEnded bool // sinkDone was called (or is being called)
}

// tryWriter is a sink that can take bytes without waiting
// (netstack.Conn.TryWrite): it writes what fits now, possibly nothing,
// and returns an error when it took nothing (would block, or failed).
type tryWriter interface {
	TryWrite(p []byte) (int, error)
}

// drainersStarted counts drainer goroutines started, for tests.
var drainersStarted atomic.Int64

func newStream(s *Session, id uint32) *Stream {
	st := &Stream{s: s, id: id, readable: make(chan struct{}, 1), recvWin: StreamWindow, sendWin: StreamWindow}
	if s.client {
		st.replyCh = make(chan struct{})
		st.sendWin = InitialStreamWindow // until ReplyOK
	} else {
		st.recvWin = InitialStreamWindow // until Accept
	}
	return st
}

// ID is the stream's id on its session.
func (st *Stream) ID() uint32 { return st.id }

// Payload is what the client sent in the Open frame (the tunnel header).
func (st *Stream) Payload() []byte { return st.payload }

// Opened is when the stream was opened (client) or its Open arrived
// (server).
func (st *Stream) Opened() time.Time { return st.opened }

// Context (server streams) is done once the stream is cut (the peer
// reset it, it was refused or aborted, the session ended) or its handler
// returned (and released its Holds): what the handler does for it (checks, the dial into the pod)
// stops with it. A client stream's is context.Background().
func (st *Stream) Context() context.Context {
	if st.ctx == nil {
		return context.Background()
	}
	return st.ctx
}

// Session is the session carrying the stream.
func (st *Stream) Session() *Session { return st.s }

func (st *Stream) signalReadable() {
	select {
	case st.readable <- struct{}{}:
	default:
	}
}

func (st *Stream) signalWindowLocked() {
	if st.winCh != nil {
		close(st.winCh)
		st.winCh = nil
	}
}

// failLocked ends both directions with err, dropping unread bytes.
// peerGone: the peer has forgotten the stream (it reset or refused it),
// so nothing more is sent for it and it is removed.
func (st *Stream) failLocked(err error, peerGone bool) {
	if st.readErr == nil || st.readErr == io.EOF {
		st.readErr = err
	}
	if st.writeErr == nil {
		st.writeErr = err
	}
	st.dropQueueLocked()
	st.signalReadable()
	st.kickLocked()
	st.signalWindowLocked()
	st.closeReplyLocked()
	if st.cancel != nil {
		st.cancel()
	}
	if peerGone {
		st.sentReset = true
		st.s.removeLocked(st)
	}
}

// closeReplyLocked wakes WaitReply: the reply came, or never will.
func (st *Stream) closeReplyLocked() {
	if st.replyCh != nil && !isClosed(st.replyCh) {
		close(st.replyCh)
	}
	if st.replyTimer != nil {
		st.replyTimer.Stop()
		st.replyTimer = nil
	}
}

func (st *Stream) dropQueueLocked() {
	if st.queued > 0 {
		st.s.recvUnacked += int64(st.queued)
	}
	for _, c := range st.queue {
		putChunk(c)
	}
	st.queue, st.off, st.queued = nil, 0, 0
}

// WaitReply waits for the server's answer to a client stream: nil if it
// accepted, an error wrapping *tunnel.RefusedError if it refused, or the
// error that ended the stream or session first.
func (st *Stream) WaitReply(ctx context.Context) error {
	if st.replyCh == nil {
		return errors.New("mux: only client streams have a reply")
	}
	st.uncork()
	select {
	case <-st.replyCh:
	case <-st.s.done:
	case <-ctx.Done():
		return fmt.Errorf("wait for tunnel reply: %w", ctx.Err())
	}
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	if st.replied && st.writeErr == nil {
		return nil
	}
	if st.writeErr != nil {
		return st.writeErr
	}
	return st.s.err
}

// Accept answers a server stream's Open with ReplyOK.
func (st *Stream) Accept() error {
	st.s.mu.Lock()
	if st.s.client || st.replied {
		st.s.mu.Unlock()
		return errors.New("mux: accept: not an unanswered server stream")
	}
	if st.s.streams[st.id] != st {
		err := st.readErr
		st.s.mu.Unlock()
		return fmt.Errorf("accept tunnel stream: %w", err)
	}
	st.replied = true
	// ReplyOK grants the client the rest of the stream window.
	st.recvWin += StreamWindow - InitialStreamWindow
	st.s.mu.Unlock()
	return st.s.writeFrame(FrameReply, st.id, []byte{tunnel.ReplyOK})
}

// Refuse answers a server stream's Open with a refusal and forgets the
// stream (and any bytes the client sent ahead).
func (st *Stream) Refuse(reason tunnel.Reason) error {
	if reason == tunnel.ReasonNone {
		return errors.New("mux: refuse without a reason")
	}
	st.s.mu.Lock()
	if st.s.client || st.replied {
		st.s.mu.Unlock()
		return errors.New("mux: refuse: not an unanswered server stream")
	}
	st.replied = true
	// A stream the peer has reset is forgotten on both sides: no reply.
	gone := st.s.streams[st.id] != st
	st.failLocked(fmt.Errorf("tunnel stream refused: %w", net.ErrClosed), true)
	st.s.mu.Unlock()
	if gone {
		return nil
	}
	return st.s.writeFrame(FrameReply, st.id, []byte{tunnel.ReplyRefused, byte(reason)})
}

// Read returns received bytes; io.EOF after the peer's End, an error
// wrapping tunnel.ErrPeerReset after its Reset, one wrapping
// *tunnel.RefusedError if the server refused the stream, and one wrapping
// ErrConnLost (and io.ErrUnexpectedEOF) if the connection broke.
func (st *Stream) Read(p []byte) (int, error) {
	s := st.s
	for {
		s.mu.Lock()
		if st.queued > 0 {
			n := 0
			for n < len(p) && len(st.queue) > 0 {
				c := st.queue[0]
				k := copy(p[n:], c.b[st.off:])
				n += k
				st.off += k
				if st.off == len(c.b) {
					st.queue[0] = nil
					st.queue = st.queue[1:]
					st.off = 0
					putChunk(c)
				}
			}
			st.queued -= n
			if len(st.queue) == 0 {
				st.queue = nil // let go of the slice's array while idle
			}
			s.mu.Unlock()
			s.credit(st, n)
			return n, nil
		}
		if err := st.readErr; err != nil {
			s.mu.Unlock()
			return 0, err
		}
		corked := st.corked
		s.mu.Unlock()
		if len(p) == 0 {
			return 0, nil
		}
		if corked {
			st.uncork()
		}
		select {
		case <-st.readable:
		case <-st.rd.wait():
			return 0, os.ErrDeadlineExceeded
		}
	}
}

// DrainAsync (tunnel.AsyncDrainer) makes the stream write what it
// receives to w by itself, with no goroutine parked while it is idle:
// routineRead writes a Data frame straight into w when nothing is queued
// and w takes it without waiting (w has TryWrite); otherwise the bytes
// are queued and one drainer goroutine writes the queue out (blocking
// writes are fine there) and exits once it is empty. routineRead never
// waits for w: a stalled pod stalls its own stream only. Bytes keep their
// order and w never has two writers at once. moved is called after each
// write to w. done is called once, from the drainer, when the read side
// ended and everything before the end was written: nil after the peer's
// End, the error otherwise (a reset, a cut, a failed write); it may block
// (it passes the end on). DrainAsync is called at most once, and not
// together with Read or DrainTo.
//
// Bytes already queued (a new stream's first data, sent with its Open)
// are written by the caller itself as far as w takes them without
// waiting: on the accepting agent that is the request on its way to the
// pod, and a drainer started for it would first wait to be scheduled.
func (st *Stream) DrainAsync(w io.Writer, moved func(int), done func(error)) {
	s := st.s
	tw, _ := w.(tryWriter)
	s.mu.Lock()
	st.sink, st.sinkTry, st.sinkMoved, st.sinkDone = w, tw, moved, done
	corked := st.corked
	if tw != nil {
		st.tryDrainLocked()
	}
	st.kickLocked()
	s.mu.Unlock()
	if corked {
		// As Read does: a server that speaks first must get the Open.
		st.uncork()
	}
}

// tryDrainLocked writes the queue to the sink as far as it takes bytes
// without waiting (TryWrite), on the caller's goroutine; what is left
// stays queued for the drainer. Called with s.mu held and the sink
// attached; it unlocks s.mu while it writes (the sink is marked busy
// meanwhile, so routineRead queues behind it and starts no drainer). It
// may write Window frames (credit): never call it from routineRead.
func (st *Stream) tryDrainLocked() {
	s := st.s
	if st.sinkBusy || st.sinkEnded {
		return
	}
	st.sinkBusy = true
	for st.queued > 0 {
		// Off the queue before it is written out, as in routineDrain:
		// routineRead may append to the queue's tail meanwhile.
		c, off := st.queue[0], st.off
		st.queue[0] = nil
		st.queue = st.queue[1:]
		if len(st.queue) == 0 {
			st.queue = nil
		}
		st.off = 0
		b := c.b[off:]
		st.queued -= len(b)
		try, moved := st.sinkTry, st.sinkMoved
		s.mu.Unlock()
		k, _ := try.TryWrite(b) // an error: the drainer's Write reports it
		if k > 0 {
			moved(k)
			s.credit(st, k)
		}
		s.mu.Lock()
		if k < len(b) {
			if st.readErr != nil && st.readErr != io.EOF {
				// Cut while we wrote: the queue was dropped
				// (failLocked), and the rest goes with it. (An End
				// that came meanwhile is different: what came before
				// it must still be written.)
				s.recvUnacked += int64(len(b) - k)
				putChunk(c)
				break
			}
			// The sink is full (or failed): the rest goes back first.
			st.queue = append([]*chunk{c}, st.queue...)
			st.off = off + k
			st.queued += len(b) - k
			break
		}
		putChunk(c)
	}
	st.sinkBusy = false
}

// kickLocked starts the drainer if the sink is attached and free and
// there is work: queued bytes, or an end to pass on.
func (st *Stream) kickLocked() {
	if st.sinkDone == nil || st.sinkBusy || st.sinkEnded || (st.queued == 0 && st.readErr == nil) {
		return
	}
	st.sinkBusy = true
	drainersStarted.Add(1)
	st.s.spawn(st.routineDrain) // owned by the stream: exits once the queue is empty or the end is passed on
}

// routineDrain writes the queue to the sink until it is empty (then it
// exits; the next frame that cannot go inline starts another) or the
// read side ended (then it calls sinkDone).
func (st *Stream) routineDrain() {
	s := st.s
	for {
		s.mu.Lock()
		if st.queued > 0 {
			c := st.queue[0]
			b := c.b[st.off:]
			st.queue[0] = nil
			st.queue = st.queue[1:]
			if len(st.queue) == 0 {
				st.queue = nil
			}
			st.off = 0
			st.queued -= len(b)
			w, moved := st.sink, st.sinkMoved
			s.mu.Unlock()
			n, err := w.Write(b)
			putChunk(c)
			s.credit(st, len(b))
			if n > 0 {
				moved(n)
			}
			if err != nil {
				st.endDrain(fmt.Errorf("write: %w", err))
				return
			}
			continue
		}
		err := st.readErr
		if err == nil {
			st.sinkBusy = false
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		if err == io.EOF {
			err = nil
		} else {
			err = fmt.Errorf("read: %w", err)
		}
		st.endDrain(err)
		return
	}
}

// endDrain reports the end of the drain once; the sink is never written
// again.
func (st *Stream) endDrain(err error) {
	s := st.s
	s.mu.Lock()
	st.sinkEnded = true
	done := st.sinkDone
	s.mu.Unlock()
	done(err)
}

// Write sends p as Data frames as the windows allow.
func (st *Stream) Write(p []byte) (int, error) {
	s := st.s
	written := 0
	for len(p) > 0 {
		s.mu.Lock()
		var n int
		for {
			if st.writeErr != nil {
				err := st.writeErr
				s.mu.Unlock()
				return written, err
			}
			if st.sentEnd || st.sentReset {
				s.mu.Unlock()
				return written, fmt.Errorf("write tunnel stream: %w", net.ErrClosed)
			}
			n = int(min(int64(len(p)), st.sendWin, s.sendWin))
			if n > 0 {
				break
			}
			// Woken by the stream's window, or its end (st.winCh), or
			// the connection's window, or its end (s.winCh).
			if s.err != nil {
				err := s.err
				s.mu.Unlock()
				return written, err
			}
			if st.winCh == nil {
				st.winCh = make(chan struct{})
			}
			if s.winCh == nil {
				s.winCh = make(chan struct{})
			}
			streamCh, connCh := st.winCh, s.winCh
			s.mu.Unlock()
			select {
			case <-streamCh:
			case <-connCh:
			case <-st.wd.wait():
				return written, os.ErrDeadlineExceeded
			}
			s.mu.Lock()
		}
		st.sendWin -= int64(n)
		s.sendWin -= int64(n)
		st.corked = false // this write flushes the Open with it
		s.mu.Unlock()
		if err := s.writeData(st.id, p[:n]); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// writeData queues p as Data frames of at most MaxPayload and flushes
// once: a large write leaves in one connection write.
func (s *Session) writeData(id uint32, p []byte) error {
	s.wmu.Lock()
	if s.werr != nil {
		err := s.werr
		s.wmu.Unlock()
		return err
	}
	for len(p) > 0 {
		n := min(len(p), MaxPayload)
		s.reserveLocked(HeaderLen + n)
		s.wbuf = appendHeader(s.wbuf, FrameData, id, n)
		s.wbuf = append(s.wbuf, p[:n]...)
		p = p[n:]
	}
	return s.flushLocked()
}

// CloseWrite ends this direction cleanly (an End frame).
func (st *Stream) CloseWrite() error {
	s := st.s
	s.mu.Lock()
	if st.sentEnd || st.sentReset {
		s.mu.Unlock()
		return nil
	}
	if err := st.writeErr; err != nil {
		s.mu.Unlock()
		return err
	}
	st.sentEnd = true
	s.maybeRemoveLocked(st)
	s.mu.Unlock()
	return s.writeFrame(FrameEnd, st.id, nil)
}

// Abort cuts the stream: a Reset frame tells the peer, and local reads
// and writes fail. The session goes on.
func (st *Stream) Abort() {
	st.abortWith(fmt.Errorf("tunnel stream aborted: %w", net.ErrClosed), false)
}

// abortWith is Abort with the error local reads and writes return; with
// unreplied, only if the stream's reply has not come. It reports whether
// it cut the stream.
func (st *Stream) abortWith(err error, unreplied bool) bool {
	s := st.s
	s.mu.Lock()
	if s.streams[st.id] != st || (unreplied && st.replied) {
		s.mu.Unlock()
		return false
	}
	send := !st.sentReset && s.err == nil
	st.sentReset = true
	st.failLocked(err, false)
	s.removeLocked(st)
	s.mu.Unlock()
	if send {
		// Queued, not written inline: Abort is called from anywhere (a
		// splice ending, a reply timer) and must not wait for a slow
		// connection. The next flush, or routineWrite, sends it.
		_ = s.queueFrames(appendHeader(nil, FrameReset, st.id, 0), false)
	}
	return true
}

// Close ends the stream: after a clean end both ways it only forgets it,
// otherwise it is an Abort.
func (st *Stream) Close() error {
	s := st.s
	s.mu.Lock()
	if s.streams[st.id] != st {
		if st.readErr == nil || st.readErr == io.EOF {
			st.readErr = fmt.Errorf("read tunnel stream: %w", net.ErrClosed)
		}
		st.dropQueueLocked()
		st.kickLocked()
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	st.Abort()
	return nil
}

func (st *Stream) LocalAddr() net.Addr  { return st.s.conn.LocalAddr() }
func (st *Stream) RemoteAddr() net.Addr { return st.s.conn.RemoteAddr() }

func (st *Stream) SetDeadline(t time.Time) error {
	st.rd.set(t)
	st.wd.set(t)
	return nil
}

func (st *Stream) SetReadDeadline(t time.Time) error  { st.rd.set(t); return nil }
func (st *Stream) SetWriteDeadline(t time.Time) error { st.wd.set(t); return nil }

// chunk is a pooled receive buffer: one large Data frame's payload, or
// small ones coalesced.
type chunk struct{ b []byte }

const smallChunk = 2 << 10

// coalesceMax is the largest Data payload copied onto a stream's tail
// chunk (see Session.onData); larger ones get a chunk of their own, which
// they fill at least half.
const coalesceMax = MaxPayload / 2

var (
	smallChunks = sync.Pool{New: func() any { return &chunk{b: make([]byte, 0, smallChunk)} }}
	bigChunks   = sync.Pool{New: func() any { return &chunk{b: make([]byte, 0, MaxPayload)} }}
)

// getChunk returns a chunk of length n (at most MaxPayload).
func getChunk(n int) *chunk {
	var c *chunk
	if n <= smallChunk {
		c = smallChunks.Get().(*chunk)
	} else {
		c = bigChunks.Get().(*chunk)
	}
	c.b = c.b[:n]
	return c
}

func putChunk(c *chunk) {
	switch cap(c.b) {
	case smallChunk:
		smallChunks.Put(c)
	case MaxPayload:
		bigChunks.Put(c)
	}
}
