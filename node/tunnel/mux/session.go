package mux

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

// ALPN is the protocol name a version 3 client offers and a version 3
// server selects. A server that selects nothing speaks version 2: one pod
// connection per TLS connection (tunnel.Header, tunnel.FramedConn).
const ALPN = "tunmesh/3"

// Windows of the flow control. They are part of the protocol: both sides
// start from them, and a receiver grants more with Window frames as its
// reader consumes. Sized for throughput as Istio's ztunnel does (4 MiB per
// stream, 16 MiB per connection): one stream can fill a fast link, and no
// connection buffers more than ConnWindow on the receiving side.
//
// A new stream's client-to-server direction starts with only
// InitialStreamWindow (the bytes a client sends with its Open, before the
// server has checked it: enough for the first request of a typical
// protocol); the server's ReplyOK grants it the rest of StreamWindow, with
// no Window frame. Bytes the server holds for streams it has not accepted
// are thus 64 KiB each, not 4 MiB.
const (
	StreamWindow        = 4 << 20
	ConnWindow          = 16 << 20
	InitialStreamWindow = 64 << 10
)

// DefaultMaxStreams is the default number of concurrent streams a server
// session lets its peer open; past it an Open is refused (ReasonBusy).
const DefaultMaxStreams = 1024

// ErrConnLost means the stream's connection broke (or was closed) before
// the stream ended: the stream is cut. It wraps io.ErrUnexpectedEOF, so
// tunnel.EndOf names it "truncated" and it is never taken for a clean end.
var ErrConnLost = fmt.Errorf("mux: tunnel connection lost: %w", io.ErrUnexpectedEOF)

// ErrReplyTimeout cuts a client stream whose reply did not come within
// Config.ReplyTimeout.
var ErrReplyTimeout = errors.New("mux: no reply from the server in time")

// ErrIdle is why a server session closed itself for want of streams
// (Config.IdleTimeout, Config.FirstOpenTimeout).
var ErrIdle = errors.New("mux: session idle")

// ErrPeerCertExpired is why a server session closed at its client's
// certificate's expiry (Config.Expires).
var ErrPeerCertExpired = errors.New("mux: the peer's certificate expired")

// ErrSessionClosed is returned by OpenStream on a session that is closed,
// closing, or out of stream ids.
var ErrSessionClosed = errors.New("mux: session closed")

// Config tunes a session. The zero value is ready to use.
type Config struct {
	// MaxStreams caps the streams the peer may have open at once on a
	// server session (default DefaultMaxStreams): a stream counts until
	// its handler has returned (and its Holds are released), even if the
	// peer reset it before. Unused by clients.
	MaxStreams int
	// Context, if set, is the parent of every server stream's Context
	// (default context.Background()).
	Context context.Context
	// IdleTimeout, if set on a server session, closes it once it has had
	// no stream for that long (ErrIdle): a peer that holds a connection
	// and sends nothing does not keep its slot. Set it above the client
	// pool's idle close, which should come first.
	IdleTimeout time.Duration
	// FirstOpenTimeout, if set on a server session, closes it if no Open
	// has come within it of the start (ErrIdle), as version 2 bounds the
	// wait for its header.
	FirstOpenTimeout time.Duration
	// Expires, if set on a server session, is when the client's
	// certificate chain expires (its earliest NotAfter): Opens from then
	// on are refused (ReasonBusy), and the session closes ExpiryGrace
	// later (default 1 minute; ErrPeerCertExpired), cutting what still
	// runs on it. The client's pool stops using a connection before (see
	// Drain).
	Expires     time.Time
	ExpiryGrace time.Duration
	// WriteTimeout bounds one write to the connection; a peer that stops
	// reading for longer is declared dead (default 30s). Flow control
	// means a live peer always reads.
	WriteTimeout time.Duration
	// ReplyTimeout, if set on a client session, cuts a stream whose
	// reply has not come within it (ErrReplyTimeout; the pod is reset):
	// the server's checks and its dial into the pod are bounded, so a
	// stream without a verdict is a server in trouble.
	ReplyTimeout time.Duration
	// OnClose, if set, is called once when the session has ended, with
	// why (Err). It must not block.
	OnClose func(err error)
	// OnReply, if set on a client session, is called from the reader
	// when a stream's reply arrives (err nil: accepted), for set-up
	// latency metrics. It must not block.
	OnReply func(st *Stream, err error)
	// Go, if set, starts the per-stream goroutines: a server stream's
	// handler and a stream's drainer (DrainAsync). A worker pool, whose
	// goroutines have grown their stacks already, saves the stack copies
	// a fresh goroutine makes per new stream. nil: goroutines of their
	// own.
	Go func(func())
}

// Session is one multiplexed tunnel connection (protocol version 3). A
// client session opens streams; a server session accepts them and hands
// each to its handler in a goroutine of its own.
//
// Goroutines: routineRead (one per session) parses frames and fills the
// streams' receive queues; routineWrite (one per session) takes over
// flushing when a writer has flushed for others long enough. Writers
// otherwise flush inline, so a small write costs no goroutine hand-off.
type Session struct {
	conn   net.Conn
	cork   corker // under conn, or nil: bulk writes held and sent as one
	client bool
	cfg    Config
	br     *bufio.Reader
	handle func(*Stream) // server: runs each accepted stream

	handlers sync.WaitGroup // server: running handlers
	loops    sync.WaitGroup // routineRead, routineWrite
	done     chan struct{}  // closed when the session ends
	kick     chan struct{}  // hands flushing to routineWrite

	mu          sync.Mutex // guards the fields below and every Stream's state
	streams     map[uint32]*Stream
	nextID      uint32        // client: the next stream id to open
	lastID      uint32        // server: the highest stream id the peer opened
	reserved    int           // client: streams promised by Reserve, not opened yet
	handling    int           // server: handlers running (a reset stream's too)
	draining    bool          // no new streams (CloseIfIdle, out of ids)
	err         error         // why the session ended; set once
	sendWin     int64         // connection send window left
	winCh       chan struct{} // made by a writer waiting for connection window; closed on growth or the end
	recvWin     int64         // connection receive window left
	recvUnacked int64         // consumed but not yet granted back
	idleSince   time.Time
	reaper      *time.Timer // server: see reap
	expiry      *time.Timer // server: see Config.Expires

	scratch []byte // routineRead's, made at the first small Data frame; see onData

	wmu         sync.Mutex // guards the write state below
	wbuf        []byte     // frames waiting for the connection: the segment being filled
	wfull       [][]byte   // full segments queued before wbuf, in order
	wspare      []byte     // a small segment kept for the next frames
	flushing    bool       // someone owns the flush
	ctrlQueued  int        // frames routineRead queued since the last write began (see queueRaw)
	werr        error
	deadlineSet time.Time // when the write deadline was last moved
}

// Client starts a client session on conn (a *tls.Conn that negotiated
// ALPN).
func Client(conn net.Conn, cfg Config) *Session {
	s := newSession(conn, true, cfg, nil)
	s.nextID = 1
	s.start()
	return s
}

// Server starts a server session on conn. handle runs once per stream the
// peer opens, in its own goroutine; it must Accept or Refuse the stream
// (Close refuses it too) and own it until it ends.
func Server(conn net.Conn, cfg Config, handle func(*Stream)) *Session {
	s := newSession(conn, false, cfg, handle)
	s.start()
	if first := cfg.FirstOpenTimeout; first > 0 || cfg.IdleTimeout > 0 {
		if first <= 0 {
			first = cfg.IdleTimeout
		}
		s.mu.Lock()
		if s.err == nil {
			s.reaper = time.AfterFunc(first, s.reap)
		}
		s.mu.Unlock()
	}
	if !cfg.Expires.IsZero() {
		s.mu.Lock()
		if s.err == nil {
			s.expiry = time.AfterFunc(time.Until(cfg.Expires)+s.cfg.ExpiryGrace, func() { s.fail(ErrPeerCertExpired) })
		}
		s.mu.Unlock()
	}
	return s
}

func newSession(conn net.Conn, client bool, cfg Config, handle func(*Stream)) *Session {
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	if cfg.ExpiryGrace <= 0 {
		cfg.ExpiryGrace = time.Minute
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	return &Session{
		conn: conn, client: client, cfg: cfg, handle: handle, cork: corkerUnder(conn),
		// Small: header reads go through it, and the rest of a large
		// payload is read straight into the stream's chunk (bufio skips its
		// buffer for reads larger than it).
		br:      bufio.NewReaderSize(conn, 4<<10),
		done:    make(chan struct{}),
		kick:    make(chan struct{}, 1),
		streams: map[uint32]*Stream{},
		sendWin: ConnWindow, recvWin: ConnWindow,
		idleSince: time.Now(),
	}
}

func (s *Session) start() {
	s.loops.Add(2)
	go s.routineRead()
	go s.routineWrite()
}

// spawn runs f on Config.Go, or in a goroutine of its own.
func (s *Session) spawn(f func()) {
	if s.cfg.Go != nil {
		s.cfg.Go(f)
		return
	}
	go f()
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended (nil while it runs).
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close ends the session: every open stream is cut.
func (s *Session) Close() error {
	s.fail(ErrSessionClosed)
	return nil
}

// Wait waits for the session's goroutines and, on a server, its stream
// handlers. Call it after Close (or once Done is closed).
func (s *Session) Wait() {
	s.loops.Wait()
	s.handlers.Wait()
}

// Load reports the session's open (and reserved) streams and how much of
// the connection's send window is in use, for a pool choosing where to
// open a stream. closed is true once it takes no new streams.
func (s *Session) Load() (streams int, inFlight int64, closed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.activeLocked(), ConnWindow - s.sendWin, s.err != nil || s.draining
}

// activeLocked counts the session's streams: open or reserved ones on a
// client; on a server, open ones or running handlers, whichever is more
// (a handler may still be checking or dialling for a stream the peer has
// reset).
func (s *Session) activeLocked() int {
	return max(len(s.streams), s.handling) + s.reserved
}

// Reserve promises one OpenStream on a client session, so that
// CloseIfIdle does not close it in between; false if it takes no new
// streams. Every true is followed by OpenStream or Unreserve.
func (s *Session) Reserve() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil || s.draining {
		return false
	}
	s.reserved++
	return true
}

// Unreserve gives back a reservation without opening a stream.
func (s *Session) Unreserve() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved--
	if s.activeLocked() == 0 {
		s.idleSince = time.Now()
	}
}

// CloseIfIdle closes the session if it has had no stream for at least
// idle (a draining one: if it has no stream), and reports whether it did
// (or it had ended already).
func (s *Session) CloseIfIdle(idle time.Duration) bool {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return true
	}
	if s.activeLocked() > 0 || (!s.draining && time.Since(s.idleSince) < idle) {
		s.mu.Unlock()
		return false
	}
	s.draining = true
	s.mu.Unlock()
	s.fail(ErrSessionClosed)
	return true
}

// Drain makes a client session take no new streams (Reserve fails, Load
// reports it closed); the streams on it go on, and CloseIfIdle closes it
// once they have ended. For a connection whose certificate was renewed or
// that has been up long enough.
func (s *Session) Drain() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.draining = true
}

// OpenStream opens a stream on a client session, consuming a reservation
// if the caller holds one (reserved). payload (the tunnel header) travels
// in the Open frame, together with the stream's first bytes; the stream
// can be written at once, and its first Read returns the server's refusal
// if there is one.
func (s *Session) OpenStream(payload []byte, reserved bool) (*Stream, error) {
	if !s.client {
		return nil, errors.New("mux: only a client session opens streams")
	}
	if len(payload) == 0 || len(payload) > MaxOpenPayload {
		if reserved {
			s.Unreserve()
		}
		return nil, fmt.Errorf("mux: open payload of %d bytes", len(payload))
	}
	s.mu.Lock()
	if reserved {
		s.reserved--
	}
	if s.err != nil || (s.draining && !reserved) {
		err := s.err
		s.mu.Unlock()
		if err == nil {
			err = ErrSessionClosed
		}
		return nil, fmt.Errorf("open stream: %w", err)
	}
	id := s.nextID
	s.nextID += 2
	if s.nextID >= 1<<31 {
		s.draining = true // out of ids: the pool opens another session
	}
	st := newStream(s, id)
	st.opened = time.Now()
	st.corked = true
	s.streams[id] = st
	if s.cfg.ReplyTimeout > 0 {
		st.replyTimer = time.AfterFunc(s.cfg.ReplyTimeout, func() {
			if st.abortWith(fmt.Errorf("open tunnel stream: %w", ErrReplyTimeout), true) {
				// A server that answers nothing in time may be gone
				// silently: no new streams here (the pool dials anew);
				// the session closes once its streams have ended.
				s.Drain()
			}
		})
	}
	// Queue the Open before anyone can open a later id: the server
	// requires ids in order. (Lock order: mu, then wmu.)
	s.wmu.Lock()
	s.mu.Unlock()
	if s.werr != nil {
		err := s.werr
		s.wmu.Unlock()
		return nil, fmt.Errorf("open stream: %w", err)
	}
	s.reserveLocked(HeaderLen + len(payload))
	s.wbuf = appendHeader(s.wbuf, FrameOpen, id, len(payload))
	s.wbuf = append(s.wbuf, payload...)
	// Corked: the Open leaves with the stream's first write (one record
	// for the header and the pod's first bytes), or when the stream is
	// first read, closed or waited on (a server-first protocol: nothing
	// to write), whichever comes first — or with anyone's flush.
	s.wmu.Unlock()
	return st, nil
}

// uncork sends the stream's Open if it is still queued (see OpenStream).
func (st *Stream) uncork() {
	s := st.s
	s.mu.Lock()
	corked := st.corked
	st.corked = false
	s.mu.Unlock()
	if corked {
		s.wmu.Lock()
		if s.werr != nil {
			s.wmu.Unlock()
			return
		}
		_ = s.flushLocked() // a failed write fails the session
	}
}

// routineRead reads and dispatches frames until the connection fails.
func (s *Session) routineRead() {
	defer s.loops.Done()
	var buf []byte
	var h [HeaderLen]byte // outside the loop: it escapes, once
	for {
		if _, err := io.ReadFull(s.br, h[:]); err != nil {
			s.fail(err)
			return
		}
		f, err := ParseHeader(h)
		if err == nil {
			if f.Type == FrameData {
				err = s.onData(f)
			} else {
				if cap(buf) < f.Len {
					buf = make([]byte, MaxOpenPayload)
				}
				buf = buf[:f.Len]
				if _, err = io.ReadFull(s.br, buf); err == nil {
					var out []byte
					if out, err = s.onControl(f, buf); err == nil && out != nil {
						err = s.queueRaw(out)
					}
				}
			}
		}
		if err != nil {
			s.fail(err)
			return
		}
	}
}

// knownLocked reports whether id is a stream that was opened on this
// session (so a frame for it after it ended is late, not invented).
func (s *Session) knownLocked(id uint32) bool {
	if id%2 == 0 {
		return false
	}
	if s.client {
		return id < s.nextID
	}
	return id <= s.lastID
}

// onData receives a Data frame's payload into its stream's queue. The
// payload is read without the lock held (only this goroutine reads the
// connection), into a pooled chunk the stream's reader gives back.
func (s *Session) onData(f Frame) error {
	s.mu.Lock()
	if int64(f.Len) > s.recvWin {
		s.mu.Unlock()
		return fmt.Errorf("%w: %d bytes past the connection window", ErrProtocol, f.Len)
	}
	s.recvWin -= int64(f.Len)
	st := s.streams[f.Stream]
	if st == nil {
		known := s.knownLocked(f.Stream)
		s.mu.Unlock()
		if !known {
			return fmt.Errorf("%w: data for stream %d that was never opened", ErrProtocol, f.Stream)
		}
		// Late data for a stream we already ended: discard and credit.
		if _, err := s.br.Discard(f.Len); err != nil {
			return err
		}
		s.creditFromReader(f.Len)
		return nil
	}
	switch {
	case st.gotEnd:
		s.mu.Unlock()
		return fmt.Errorf("%w: data on stream %d after its end", ErrProtocol, f.Stream)
	case s.client && !st.replied:
		s.mu.Unlock()
		return fmt.Errorf("%w: data on stream %d before its reply", ErrProtocol, f.Stream)
	case int64(f.Len) > st.recvWin:
		s.mu.Unlock()
		return fmt.Errorf("%w: %d bytes past stream %d's window", ErrProtocol, f.Len, f.Stream)
	}
	st.recvWin -= int64(f.Len)
	s.mu.Unlock()

	// The windows count payload bytes, so what the queue holds must cost
	// about as much memory as it carries: a frame of up to coalesceMax
	// bytes is read into the reader's scratch buffer and copied onto the
	// tail chunk while it has room (a peer sending one-byte frames would
	// otherwise pin a 2 KiB chunk per byte of window). A larger frame is
	// read straight into a chunk of its own, at least half full.
	var c *chunk
	if f.Len <= coalesceMax {
		if s.scratch == nil {
			s.scratch = make([]byte, coalesceMax)
		}
		if _, err := io.ReadFull(s.br, s.scratch[:f.Len]); err != nil {
			return err
		}
	} else {
		c = getChunk(f.Len)
		if _, err := io.ReadFull(s.br, c.b); err != nil {
			putChunk(c)
			return err
		}
	}
	s.mu.Lock()
	if s.streams[f.Stream] != st || st.readErr != nil {
		// Ended (reset, closed) while we read: discard.
		s.mu.Unlock()
		if c != nil {
			putChunk(c)
		}
		s.creditFromReader(f.Len)
		return nil
	}
	if st.sinkTry != nil && !st.sinkBusy && !st.sinkEnded && st.queued == 0 && f.Len <= maxInline {
		return s.deliverInline(st, f.Len, c)
	}
	if c == nil {
		p := s.scratch[:f.Len]
		// The tail is never being read outside the lock: the drainer takes
		// a chunk off the queue before it writes it out.
		if n := len(st.queue); n > 0 && cap(st.queue[n-1].b)-len(st.queue[n-1].b) >= len(p) {
			t := st.queue[n-1]
			t.b = append(t.b, p...)
		} else {
			c = getChunk(len(p))
			copy(c.b, p)
		}
	}
	if c != nil {
		st.queue = append(st.queue, c)
	}
	st.queued += f.Len
	st.kickLocked()
	s.mu.Unlock()
	st.signalReadable()
	return nil
}

// maxInline is the largest Data frame the session reader writes into a
// stream's sink itself. Small frames are messages (requests, replies, the
// round trip): writing them inline saves a goroutine wake-up each. Larger
// frames are bulk transfer, and there the drainer is a pipeline stage: the
// reader decrypts the next record on one CPU while the drainer pushes the
// last one through the pod's netstack and TUN on the other. Delivering bulk
// inline serialized the two and cost a fifth of the throughput in `make
// bench` (592 -> 468 MB/s, CPU per GB 2.62 -> 2.95 s).
const maxInline = 4 << 10

// deliverInline writes a Data frame's payload (in c, or the scratch
// buffer if c is nil) straight into the stream's sink, without waiting:
// the common case of a small message to a pod with room costs no
// goroutine wake-up. What the sink does not take now is queued for the
// drainer. Called with s.mu held and the queue empty; unlocks it.
func (s *Session) deliverInline(st *Stream, n int, c *chunk) error {
	var p []byte
	if c != nil {
		p = c.b
	} else {
		p = s.scratch[:n]
	}
	st.sinkBusy = true
	try, moved := st.sinkTry, st.sinkMoved
	s.mu.Unlock()
	// An error means the sink took nothing: it would block, or it failed,
	// and then the drainer's blocking Write reports why.
	k, _ := try.TryWrite(p)
	if k > 0 {
		moved(k)
		s.creditNoWait(st, k)
	}
	rest := p[k:]
	s.mu.Lock()
	if len(rest) > 0 {
		if s.streams[st.id] != st || st.readErr != nil {
			// Ended while we wrote: drop the rest.
			s.mu.Unlock()
			s.creditFromReader(len(rest))
			s.mu.Lock()
		} else {
			q := getChunk(len(rest))
			copy(q.b, rest)
			st.queue = append(st.queue, q)
			st.queued += len(rest)
		}
	}
	if c != nil {
		putChunk(c)
	}
	st.sinkBusy = false
	st.kickLocked() // the rest, or an end that came meanwhile
	s.mu.Unlock()
	return nil
}

// onControl handles every frame but Data. out is a frame to send back.
func (s *Session) onControl(f Frame, p []byte) (out []byte, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.Type == FrameOpen {
		return s.onOpenLocked(f, p)
	}
	return nil, s.onStreamFrameLocked(f, p)
}

func (s *Session) onStreamFrameLocked(f Frame, p []byte) error {
	if f.Type == FrameWindow {
		inc := int64(binary.BigEndian.Uint32(p))
		if inc == 0 {
			return fmt.Errorf("%w: zero window update on stream %d", ErrProtocol, f.Stream)
		}
		if f.Stream == 0 {
			if s.sendWin += inc; s.sendWin > maxWindow {
				return fmt.Errorf("%w: connection window above %d", ErrProtocol, maxWindow)
			}
			if s.winCh != nil { // a writer waits
				close(s.winCh)
				s.winCh = nil
			}
			return nil
		}
	} else if f.Type == FrameReply && !s.client {
		return fmt.Errorf("%w: reply from a client", ErrProtocol)
	}
	st := s.streams[f.Stream]
	if st == nil {
		if !s.knownLocked(f.Stream) {
			return fmt.Errorf("%w: frame type %#02x for stream %d that was never opened", ErrProtocol, f.Type, f.Stream)
		}
		return nil // late frame for a stream that ended here
	}
	switch f.Type {
	case FrameWindow:
		if st.sendWin += int64(binary.BigEndian.Uint32(p)); st.sendWin > maxWindow {
			return fmt.Errorf("%w: stream %d window above %d", ErrProtocol, f.Stream, maxWindow)
		}
		st.signalWindowLocked()
	case FrameEnd:
		if st.gotEnd || (s.client && !st.replied) {
			return fmt.Errorf("%w: unexpected end on stream %d", ErrProtocol, f.Stream)
		}
		st.gotEnd = true
		st.readErr = io.EOF
		st.signalReadable()
		st.kickLocked()
		s.maybeRemoveLocked(st)
	case FrameReset:
		st.failLocked(fmt.Errorf("read tunnel stream: %w", tunnel.ErrPeerReset), true)
	case FrameReply:
		if st.replied {
			return fmt.Errorf("%w: second reply on stream %d", ErrProtocol, f.Stream)
		}
		var rerr error
		switch {
		case len(p) == 1 && p[0] == tunnel.ReplyOK:
			st.replied = true
			// ReplyOK grants the rest of the stream window.
			st.sendWin += StreamWindow - InitialStreamWindow
			st.signalWindowLocked()
		case len(p) == 2 && p[0] == tunnel.ReplyRefused && p[1] != 0:
			st.replied = true
			rerr = &tunnel.RefusedError{Reason: tunnel.Reason(p[1])}
			// The server forgot the stream when it refused it.
			st.failLocked(fmt.Errorf("open tunnel stream: %w", rerr), true)
		default:
			return fmt.Errorf("%w: reply % x on stream %d", ErrProtocol, p, f.Stream)
		}
		st.closeReplyLocked()
		st.signalReadable()
		if s.cfg.OnReply != nil {
			s.cfg.OnReply(st, rerr)
		}
	}
	return nil
}

func (s *Session) onOpenLocked(f Frame, p []byte) ([]byte, error) {
	if s.client {
		return nil, fmt.Errorf("%w: open from a server", ErrProtocol)
	}
	if f.Stream <= s.lastID {
		return nil, fmt.Errorf("%w: stream id %d not above %d", ErrProtocol, f.Stream, s.lastID)
	}
	s.lastID = f.Stream
	if s.err != nil {
		return nil, nil
	}
	if s.activeLocked() >= s.cfg.MaxStreams || (!s.cfg.Expires.IsZero() && !time.Now().Before(s.cfg.Expires)) {
		out := appendHeader(nil, FrameReply, f.Stream, 2)
		return append(out, tunnel.ReplyRefused, byte(tunnel.ReasonBusy)), nil
	}
	st := newStream(s, f.Stream)
	st.payload = append([]byte(nil), p...)
	st.opened = time.Now()
	parent := s.cfg.Context
	if parent == nil {
		parent = context.Background()
	}
	st.ctx, st.cancel = context.WithCancel(parent)
	s.streams[f.Stream] = st
	s.handling++
	st.holds = 1 // the handler's
	s.handlers.Add(1)
	s.spawn(func() { // RoutineStream: one per accepted stream, owned by the session
		defer s.unhold(st)
		s.handle(st)
	})
	return nil, nil
}

// Hold keeps a server stream's handling going after its handler returns,
// until release is called: the stream still counts against
// Config.MaxStreams, its Context is not done because of the return, and
// Session.Wait waits for the release as for a handler. A handler that
// hands the stream to work that reports its own end (tunnel.SpliceAsync)
// thus returns without parking a goroutine per stream. Call it from the
// handler (before it returns) or under another hold; release is
// idempotent.
func (st *Stream) Hold() (release func()) {
	s := st.s
	if s.client {
		return func() {} // only a server stream has a handler to outlive
	}
	s.mu.Lock()
	st.holds++
	s.mu.Unlock()
	s.handlers.Add(1) // the handler's own count is still up: no race with Wait
	var once sync.Once
	return func() { once.Do(func() { s.unhold(st) }) }
}

// unhold drops one hold of st (its handler's or a Hold's); the last one
// uncounts the stream's handling (see Config.MaxStreams).
func (s *Session) unhold(st *Stream) {
	defer s.handlers.Done()
	s.mu.Lock()
	st.holds--
	last := st.holds == 0
	s.mu.Unlock()
	if last {
		s.handlerDone(st)
	}
}

// handlerDone uncounts st's handler (see Config.MaxStreams).
func (s *Session) handlerDone(st *Stream) {
	st.cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handling--
	if s.activeLocked() == 0 {
		s.idleSince = time.Now()
	}
}

// reap closes a server session that never saw an Open within
// FirstOpenTimeout, or has had no stream for IdleTimeout; otherwise it
// looks again when the idle time could next be up. It runs on the reaper
// timer, never concurrently with itself.
func (s *Session) reap() {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	var idle bool
	switch {
	case s.lastID == 0 && s.cfg.FirstOpenTimeout > 0:
		idle = true
	case s.cfg.IdleTimeout <= 0:
		// Only the first Open was bounded, and it came.
	case s.activeLocked() > 0:
		s.reaper.Reset(s.cfg.IdleTimeout)
	default:
		if left := s.cfg.IdleTimeout - time.Since(s.idleSince); left > 0 {
			s.reaper.Reset(left)
		} else {
			idle = true
		}
	}
	s.mu.Unlock()
	if idle {
		s.fail(ErrIdle)
	}
}

// maybeRemoveLocked forgets st once both directions are over.
func (s *Session) maybeRemoveLocked(st *Stream) {
	if (st.sentEnd || st.sentReset) && st.readErr != nil {
		s.removeLocked(st)
	}
}

// removeLocked forgets st. Bytes it still holds stay readable (after a
// clean end both ways, the tail before the peer's End); Close drops them.
func (s *Session) removeLocked(st *Stream) {
	if s.streams[st.id] != st {
		return
	}
	delete(s.streams, st.id)
	if s.activeLocked() == 0 {
		s.idleSince = time.Now()
	}
}

// credit gives n consumed bytes back to the peer's windows (st nil: the
// connection's only), with a Window frame once a quarter of a window is
// due, so window updates stay rare and off the round trip of small
// exchanges.
func (s *Session) credit(st *Stream, n int) {
	s.mu.Lock()
	frames := s.creditLocked(st, n)
	s.mu.Unlock()
	if frames != nil {
		_ = s.writeRaw(frames) // a failed write fails the session
	}
}

// creditNoWait is credit for bytes routineRead consumed itself: written
// into a stream's sink (st), or dropped as late data for an ended stream
// (st nil). The Window frames are queued, never written inline:
// routineRead must keep reading, or two agents each blocked writing to the
// other would deadlock.
func (s *Session) creditNoWait(st *Stream, n int) {
	s.mu.Lock()
	frames := s.creditLocked(st, n)
	s.mu.Unlock()
	if frames != nil {
		_ = s.queueRaw(frames)
	}
}

// creditFromReader is creditNoWait for the connection's window only.
func (s *Session) creditFromReader(n int) { s.creditNoWait(nil, n) }

// creditLocked adds n consumed bytes to the windows' unacknowledged counts
// and returns the Window frames now due. Called with s.mu held.
func (s *Session) creditLocked(st *Stream, n int) []byte {
	var frames []byte
	s.recvUnacked += int64(n)
	if st != nil {
		st.recvUnacked += int64(n)
		if st.recvUnacked >= StreamWindow/4 && !st.gotEnd && s.streams[st.id] == st {
			frames = appendWindow(frames, st.id, st.recvUnacked)
			st.recvWin += st.recvUnacked
			st.recvUnacked = 0
		}
	}
	if s.recvUnacked >= ConnWindow/4 {
		frames = appendWindow(frames, 0, s.recvUnacked)
		s.recvWin += s.recvUnacked
		s.recvUnacked = 0
	}
	return frames
}

// MaxQueuedControlFrames bounds the frames routineRead queues in answer
// to the peer (busy refusals, window updates) while a write is under way:
// a peer that sends Opens past MaxStreams and does not read its answers
// would otherwise grow the write queue without bound. Past it the session
// fails with a protocol error. (x/net/http2's maxQueuedControlFrames.)
const MaxQueuedControlFrames = 10000

// queueRaw queues encoded frames and leaves the flush to whoever flushes,
// or to routineWrite: for routineRead, which must never block on a write.
func (s *Session) queueRaw(frames []byte) error { return s.queueFrames(frames, true) }

// queueFrames queues frames for the next flush without writing; answer:
// routineRead's answers to the peer, which are capped.
func (s *Session) queueFrames(frames []byte, answer bool) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.werr != nil {
		return s.werr
	}
	if answer { // (our own frames are bounded by our streams)
		if s.ctrlQueued++; s.ctrlQueued > MaxQueuedControlFrames {
			return fmt.Errorf("%w: more than %d answers queued for a peer that does not read them", ErrProtocol, MaxQueuedControlFrames)
		}
	}
	s.reserveLocked(len(frames))
	s.wbuf = append(s.wbuf, frames...)
	if !s.flushing {
		s.flushing = true
		select {
		case s.kick <- struct{}{}: // routineWrite owns the flush now
		default:
		}
	}
	return nil
}

func appendWindow(b []byte, id uint32, n int64) []byte {
	b = appendHeader(b, FrameWindow, id, 4)
	return binary.BigEndian.AppendUint32(b, uint32(n))
}

// fail ends the session once: the connection is closed underneath (no
// close_notify: the peer must see a cut, not an end) and every stream
// still open is cut.
func (s *Session) fail(cause error) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	if cause == nil || errors.Is(cause, io.EOF) {
		cause = io.ErrUnexpectedEOF
	}
	s.err = fmt.Errorf("%w: %w", ErrConnLost, cause)
	if errors.Is(cause, ErrSessionClosed) {
		s.err = ErrSessionClosed
	}
	for _, st := range s.streams {
		st.failLocked(fmt.Errorf("tunnel stream %d: %w: %w", st.id, ErrConnLost, cause), false)
	}
	if s.winCh != nil {
		close(s.winCh)
		s.winCh = nil
	}
	if s.reaper != nil {
		s.reaper.Stop()
	}
	if s.expiry != nil {
		s.expiry.Stop()
	}
	close(s.done)
	err := s.err
	s.mu.Unlock()
	abortConn(s.conn)
	if s.cfg.OnClose != nil {
		s.cfg.OnClose(err)
	}
}

// abortConn closes c so that its peer sees a cut: underneath a TLS
// connection, with the TCP linger at zero.
func abortConn(c net.Conn) {
	if u, ok := c.(interface{ NetConn() net.Conn }); ok {
		if inner := u.NetConn(); inner != nil {
			c = inner
		}
	}
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
	_ = c.Close()
}

// writeFrame queues one frame and flushes (see flush).
func (s *Session) writeFrame(typ byte, id uint32, payload []byte) error {
	s.wmu.Lock()
	if s.werr != nil {
		err := s.werr
		s.wmu.Unlock()
		return err
	}
	s.reserveLocked(HeaderLen + len(payload))
	s.wbuf = appendHeader(s.wbuf, typ, id, len(payload))
	s.wbuf = append(s.wbuf, payload...)
	return s.flushLocked()
}

// writeRaw queues encoded frames and flushes.
func (s *Session) writeRaw(frames []byte) error {
	s.wmu.Lock()
	if s.werr != nil {
		err := s.werr
		s.wmu.Unlock()
		return err
	}
	s.reserveLocked(len(frames))
	s.wbuf = append(s.wbuf, frames...)
	return s.flushLocked()
}

// flushBudget is how many connection writes an inline flusher makes for
// others before it hands flushing to routineWrite and gets back to its
// own stream.
const flushBudget = 4

// flushLocked writes the queued frames, called with wmu held; it unlocks.
// Whoever queues frames while nobody flushes flushes them itself, and
// frames queued meanwhile by others ride along in its next write: small
// frames of many streams (headers, window updates, small messages)
// coalesce into one write and one TLS record, and bulk data goes out in
// writes as large as what has piled up. After flushBudget rounds the
// flusher hands over to routineWrite, so no stream's goroutine is kept
// writing for the others indefinitely.
func (s *Session) flushLocked() error {
	if s.flushing {
		s.wmu.Unlock()
		return nil // the current flusher takes our frames
	}
	s.flushing = true
	for round := 0; s.queuedLocked(); round++ {
		if round == flushBudget {
			s.wmu.Unlock()
			select {
			case s.kick <- struct{}{}: // routineWrite owns the flush now
			default:
			}
			return nil
		}
		err := s.writeOnceLocked()
		if err != nil {
			s.flushing = false
			s.wmu.Unlock()
			s.fail(err)
			return err
		}
	}
	s.flushing = false
	s.wmu.Unlock()
	return nil
}

// writeOnceLocked writes what is queued, with wmu released during the
// write; it returns with wmu held.
func (s *Session) writeOnceLocked() error {
	segs := s.wfull
	if len(s.wbuf) > 0 {
		segs = append(segs, s.wbuf)
	}
	s.wfull, s.wbuf = nil, nil
	s.ctrlQueued = 0
	now := time.Now()
	refresh := now.Sub(s.deadlineSet) > s.cfg.WriteTimeout/8
	if refresh {
		// Moving the deadline costs a timer update: do it only now and then.
		s.deadlineSet = now
	}
	s.wmu.Unlock()
	if refresh {
		_ = s.conn.SetWriteDeadline(now.Add(s.cfg.WriteTimeout))
	}
	// Bulk: the TLS records of all the segments reach the kernel in
	// writes of up to 64 KiB instead of one per record (see
	// rawio.Conn.Cork).
	// One small segment is one record anyway.
	cork := s.cork != nil && (len(segs) > 1 || len(segs[0]) > corkMin)
	if cork {
		s.cork.Cork()
	}
	var err error
	for _, b := range segs {
		if _, err = s.conn.Write(b); err != nil {
			break
		}
	}
	if cork {
		if uerr := s.cork.Uncork(); err == nil {
			err = uerr
		}
	}
	s.wmu.Lock()
	for _, b := range segs {
		s.recycleLocked(b)
	}
	if err != nil {
		s.werr = fmt.Errorf("write tunnel connection: %w", err)
		return s.werr
	}
	return nil
}

// corker is a connection that can hold writes and send them as one
// (rawio.Conn).
type corker interface {
	Cork()
	Uncork() error
}

// corkMin: a write batch of one segment at most this long is one TLS
// record; holding it gains nothing.
const corkMin = 16 << 10

// corkerUnder returns the corker under conn (a *tls.Conn over a
// rawio.Conn), or nil.
func corkerUnder(conn net.Conn) corker {
	if u, ok := conn.(interface{ NetConn() net.Conn }); ok {
		if c, ok := u.NetConn().(corker); ok {
			return c
		}
	}
	return nil
}

func (s *Session) queuedLocked() bool { return len(s.wbuf) > 0 || len(s.wfull) > 0 }

// Write segments: a small one (keepWbuf) while traffic is light, pooled
// large ones (wbufPool) while it is heavy. Frames queued during a flush go
// into further segments instead of growing one buffer (which copied
// everything queued each time it grew), and an idle connection keeps only
// a small segment.
const (
	keepWbuf = 4 << 10
	bigWbuf  = 512 << 10
)

var wbufPool = sync.Pool{New: func() any { b := make([]byte, 0, bigWbuf); return &b }}

// recycleLocked takes back a written segment.
func (s *Session) recycleLocked(b []byte) {
	switch {
	case cap(b) <= keepWbuf:
		if s.wspare == nil {
			s.wspare = b[:0]
		}
	case cap(b) == bigWbuf:
		b = b[:0]
		wbufPool.Put(&b)
	}
}

// reserveLocked makes room for n more bytes in wbuf: a frame never
// straddles two segments.
func (s *Session) reserveLocked(n int) {
	if cap(s.wbuf)-len(s.wbuf) >= n {
		return
	}
	if len(s.wbuf) > 0 {
		s.wfull = append(s.wfull, s.wbuf)
	} else if s.wbuf != nil {
		s.recycleLocked(s.wbuf)
	}
	s.wbuf = nil
	switch {
	case len(s.wfull) == 0 && n <= keepWbuf && s.wspare != nil:
		s.wbuf, s.wspare = s.wspare, nil
	case len(s.wfull) == 0 && n <= keepWbuf/2:
		s.wbuf = make([]byte, 0, keepWbuf)
	case n <= bigWbuf:
		s.wbuf = (*wbufPool.Get().(*[]byte))[:0]
	default:
		s.wbuf = make([]byte, 0, n)
	}
}

// routineWrite flushes when a writer hands flushing over (see flushLocked).
func (s *Session) routineWrite() {
	defer s.loops.Done()
	for {
		select {
		case <-s.kick:
		case <-s.done:
			return
		}
		s.wmu.Lock()
		var err error
		for s.queuedLocked() && err == nil {
			err = s.writeOnceLocked()
		}
		s.flushing = false
		s.wmu.Unlock()
		if err != nil {
			s.fail(err)
		}
	}
}
