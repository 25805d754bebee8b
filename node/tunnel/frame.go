package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// Frame types of the data phase (header version 2). See the package doc.
const (
	FrameData  byte = 0x00
	FrameEnd   byte = 0x01
	FrameReset byte = 0x02
)

const (
	frameHdrLen = 3
	// MaxFramePayload keeps a frame and its header inside one TLS record
	// (16 KiB of plaintext), so a frame costs no extra record.
	MaxFramePayload = 16<<10 - frameHdrLen
)

var (
	// ErrPeerReset means the far side of the tunnel was reset (its pod
	// connection, or its agent, aborted): the stream is cut, not ended.
	ErrPeerReset = errors.New("tunnel: reset by peer")
	// ErrInvalidFrame means the peer sent a frame this version does not
	// define: a protocol error, handled as a cut stream.
	ErrInvalidFrame = errors.New("tunnel: invalid frame")
)

// FramedConn carries one pod connection's bytes over a tunnel connection
// (a *tls.Conn after the header exchange) in frames, so that the receiving
// agent tells a clean end of stream (an End frame) from a cut one (a Reset
// frame, or the connection ending without an End frame, which a bare TCP
// FIN on a TLS stream would otherwise look like). It is a net.Conn with
// CloseWrite (sends End) and Abort (sends Reset, then resets underneath).
//
// One goroutine may Read while another Writes; Abort may be called at any
// time.
type FramedConn struct {
	net.Conn // the tunnel connection; Read, Write and Close are overridden

	rmu     sync.Mutex // guards the read state
	remain  int        // payload bytes of the current data frame still unread
	readErr error      // sticky: how the peer's direction ended

	wmu     sync.Mutex // serializes frames
	wbuf    []byte
	wended  bool // End or Reset sent
	sentEnd bool // the End frame was written: this direction ended cleanly
}

// NewFramedConn frames the data phase on c.
func NewFramedConn(c net.Conn) *FramedConn { return &FramedConn{Conn: c} }

// NetConn returns the tunnel connection underneath.
func (f *FramedConn) NetConn() net.Conn { return f.Conn }

// Read returns the peer's data; io.EOF once the peer sent End, an error
// wrapping ErrPeerReset after a Reset frame, and one wrapping ErrTruncated
// when the connection ended without either.
func (f *FramedConn) Read(p []byte) (int, error) {
	f.rmu.Lock()
	defer f.rmu.Unlock()
	for f.remain == 0 {
		if f.readErr != nil {
			return 0, f.readErr
		}
		var hdr [frameHdrLen]byte
		if _, err := io.ReadFull(f.Conn, hdr[:]); err != nil {
			f.readErr = readError("read tunnel frame", err)
			return 0, f.readErr
		}
		n := int(binary.BigEndian.Uint16(hdr[1:]))
		switch {
		case hdr[0] == FrameData && n > 0 && n <= MaxFramePayload:
			f.remain = n
		case hdr[0] == FrameEnd && n == 0:
			f.readErr = io.EOF
		case hdr[0] == FrameReset && n == 0:
			f.readErr = fmt.Errorf("read tunnel frame: %w", ErrPeerReset)
		default:
			f.readErr = fmt.Errorf("read tunnel frame: %w: type %#02x length %d", ErrInvalidFrame, hdr[0], n)
		}
	}
	if len(p) > f.remain {
		p = p[:f.remain]
	}
	n, err := f.Conn.Read(p)
	f.remain -= n
	if err != nil && f.remain > 0 {
		f.readErr = readError("read tunnel frame", err)
		return n, f.readErr
	}
	return n, nil
}

// Write sends p as data frames, each in a single write of the connection.
func (f *FramedConn) Write(p []byte) (int, error) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	if f.wended {
		return 0, fmt.Errorf("write tunnel frame: %w", net.ErrClosed)
	}
	if f.wbuf == nil {
		f.wbuf = make([]byte, frameHdrLen+MaxFramePayload)
	}
	var written int
	for len(p) > 0 {
		n := min(len(p), MaxFramePayload)
		b := f.wbuf[:frameHdrLen+n]
		b[0] = FrameData
		binary.BigEndian.PutUint16(b[1:], uint16(n))
		copy(b[frameHdrLen:], p[:n])
		if _, err := f.Conn.Write(b); err != nil {
			return written, fmt.Errorf("write tunnel frame: %w", err)
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// CloseWrite ends this direction cleanly: an End frame, then the TLS
// half-close.
func (f *FramedConn) CloseWrite() error {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	if f.wended {
		return nil
	}
	f.wended = true
	if _, err := f.Conn.Write([]byte{FrameEnd, 0, 0}); err != nil {
		return fmt.Errorf("write tunnel end: %w", err)
	}
	f.sentEnd = true
	if cw, ok := f.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return nil
}

// lingerTimeout bounds how long Close waits for the peer's last bytes
// after a clean end; maxLinger bounds how many it reads.
const (
	lingerTimeout = 2 * time.Second
	maxLinger     = 64 << 10
)

// Close closes the tunnel connection. After a clean end both ways (End
// sent and End received) it first reads what the peer still sends until
// the peer's end of stream (bounded by lingerTimeout): the peer's TLS
// close_notify, which CloseWrite writes after the End frame and which may
// arrive after the End was read. Closing a TCP socket with unread bytes in
// its receive queue makes Linux answer with a reset and drop whatever it
// has not sent yet, which is the tail of the other direction: the peer
// would read a cut stream although both ends finished cleanly (seen as an
// intermittent reset of long transfers between real nodes).
func (f *FramedConn) Close() error {
	if f.rmu.TryLock() {
		if f.wmu.TryLock() {
			if f.sentEnd && f.readErr == io.EOF {
				_ = f.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
				_, _ = io.Copy(io.Discard, io.LimitReader(f.Conn, maxLinger))
			}
			f.wmu.Unlock()
		}
		f.rmu.Unlock()
	}
	return f.Conn.Close()
}

// Abort tells the peer the stream was cut (a Reset frame, if no write is
// in progress and the peer takes it within a second) and resets the
// connection underneath.
func (f *FramedConn) Abort() {
	if f.wmu.TryLock() {
		if !f.wended {
			f.wended = true
			_ = f.Conn.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = f.Conn.Write([]byte{FrameReset, 0, 0})
		}
		f.wmu.Unlock()
	}
	abort(f.Conn)
}

// EndOf names how a spliced connection ended, for metrics and logs:
// "clean", "reset", "truncated", "idle_timeout", "shutdown" or "error".
func EndOf(err error) string {
	switch {
	case err == nil:
		return "clean"
	case errors.Is(err, ErrPeerReset), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNABORTED):
		return "reset"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, ErrInvalidFrame):
		return "truncated"
	case errors.Is(err, ErrIdleTimeout):
		return "idle_timeout"
	case errors.Is(err, context.Canceled):
		return "shutdown"
	}
	return "error"
}
