package rawio

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Conn is a TCP connection whose Read and Write are raw calls made through
// the connection's netpoller (syscall.RawConn): waiting for readiness,
// deadlines and Close behave as on the *net.TCPConn it embeds, which also
// provides every other method (SetLinger, CloseWrite, addresses, ...).
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn

	rmu   sync.Mutex // one Read at a time: the callback state below
	rbuf  []byte
	rn    int
	rerr  error
	rcall func(fd uintptr) bool

	wmu   sync.Mutex // one Write at a time; guards the cork state too
	wbuf  []byte
	wn    int
	werr  error
	wcall func(fd uintptr) bool

	corked bool
	cork   *[]byte // bytes written while corked, from corkBufs
	sticky error   // a failed flush: every later Write and Uncork fail
}

// CorkLimit is how many bytes a corked Conn holds before it writes them
// out anyway. Larger holds made the benchmark cluster's bulk transfers
// slower (256 KiB: the kernel sat idle while the next 256 KiB were
// encrypted, where smaller writes overlap encryption with sending): 64
// KiB moved 768 MB/s at 1.74 agent CPU-seconds per GB, against 666 MB/s
// and 2.02 uncorked and 575-593 MB/s and 1.95-1.98 at 256 KiB
// (docs/performance.md).
const CorkLimit = 64 << 10

var corkBufs = sync.Pool{New: func() any { b := make([]byte, 0, CorkLimit); return &b }}

// ErrBlocking: the descriptor is in blocking mode, where a raw read would
// hold its P (and stop the world's garbage collection) until data came.
var ErrBlocking = errors.New("rawio: descriptor is blocking")

// NewConn wraps c. The callbacks are bound once, so Read and Write
// allocate nothing. Only Read and Write are raw: the embedded ReadFrom and
// WriteTo (used by io.Copy) are shadowed by loops over them, so that every
// write goes through Write's lock.
func NewConn(c *net.TCPConn) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("raw connection: %w", err)
	}
	var flags int
	var ferr error
	if err := rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0) }); err != nil {
		return nil, fmt.Errorf("raw connection: %w", err)
	}
	if ferr != nil {
		return nil, fmt.Errorf("raw connection: flags: %w", ferr)
	}
	if flags&unix.O_NONBLOCK == 0 {
		return nil, ErrBlocking
	}
	rw := &Conn{TCPConn: c, rc: rc}
	rw.rcall = rw.readFD
	rw.wcall = rw.writeFD
	return rw, nil
}

// Wrap returns c as a Conn when it is a TCP connection that NewConn takes,
// and c itself otherwise (another kind of connection, or a blocking
// descriptor): raw calls save wake-ups, and a connection without them
// still works.
func Wrap(c net.Conn) net.Conn {
	if tcp, ok := c.(*net.TCPConn); ok {
		if rc, err := NewConn(tcp); err == nil {
			return rc
		}
	}
	return c
}

// Read implements net.Conn; io.EOF once the peer ended its direction.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerr = p, 0, nil
	err := c.rc.Read(c.rcall)
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case c.rerr != nil:
		return 0, c.opError("read", os.NewSyscallError("read", c.rerr))
	case c.rn == 0:
		return 0, io.EOF
	}
	return c.rn, nil
}

func (c *Conn) readFD(fd uintptr) bool {
	c.rn, c.rerr = Read(fd, c.rbuf)
	if c.rerr == unix.EAGAIN {
		c.rerr = nil
		return false // park in the netpoller until readable
	}
	return true
}

// Cork holds what Write is given until Uncork (or until CorkLimit bytes
// are held), so that many small writes reach the kernel as one: crypto/tls
// writes each record of at most 16 KiB with its own Write, and a bulk
// transfer then pays a system call and the kernel's per-call and
// per-packet work for each (measured in process: a TLS bulk sender and
// receiver over loopback spent 0.80 CPU-seconds per GB with one write per
// record, 0.62-0.67 corked). The bytes are copied once more, which costs
// less than the calls saved. Cork is for bulk: a Write while corked
// reports success before the bytes are sent; a failure shows at the next
// Write or at Uncork, and the connection is then unusable.
func (c *Conn) Cork() {
	c.wmu.Lock()
	c.corked = true
	c.wmu.Unlock()
}

// Uncork writes out what Cork held and stops holding.
func (c *Conn) Uncork() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.corked = false
	return c.flushLocked()
}

// flushLocked writes the held bytes and returns the buffer to its pool.
func (c *Conn) flushLocked() error {
	if c.sticky != nil {
		return c.sticky
	}
	if c.cork == nil {
		return nil
	}
	b := *c.cork
	_, err := c.writeLocked(b)
	*c.cork = b[:0]
	corkBufs.Put(c.cork)
	c.cork = nil
	if err != nil {
		c.sticky = err
	}
	return err
}

// Write implements net.Conn: all of p, or an error.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.sticky != nil {
		return 0, c.sticky
	}
	if !c.corked {
		return c.writeLocked(p)
	}
	if c.cork != nil && len(*c.cork)+len(p) > CorkLimit {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) >= CorkLimit {
		return c.writeLocked(p)
	}
	if c.cork == nil {
		c.cork = corkBufs.Get().(*[]byte)
	}
	*c.cork = append(*c.cork, p...)
	return len(p), nil
}

// writeLocked writes all of p now.
func (c *Conn) writeLocked(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c.wbuf, c.wn, c.werr = p[n:], 0, nil
		err := c.rc.Write(c.wcall)
		c.wbuf = nil
		n += c.wn
		switch {
		case err != nil:
			return n, c.opError("write", err)
		case c.werr != nil:
			return n, c.opError("write", os.NewSyscallError("write", c.werr))
		case c.wn == 0:
			// A write of nothing without an error: never loop on it
			// (internal/poll's answer too).
			return n, c.opError("write", io.ErrUnexpectedEOF)
		}
	}
	return n, nil
}

func (c *Conn) writeFD(fd uintptr) bool {
	c.wn, c.werr = Write(fd, c.wbuf)
	if c.werr == unix.EAGAIN {
		c.werr = nil
		return false // park in the netpoller until writable
	}
	return true
}

// opError shapes err as the net package does for its own Read and Write.
// An error of the RawConn itself (deadline, closed) is an *net.OpError
// already, named for the raw call: it gets the plain name.
func (c *Conn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		e := *oe
		e.Op = op
		return &e
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// onlyReader and onlyWriter hide everything but Read or Write, so that
// io.Copy cannot come back to ReadFrom or WriteTo.
type (
	onlyReader struct{ io.Reader }
	onlyWriter struct{ io.Writer }
)

// ReadFrom copies r into the connection through Write.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(onlyWriter{c}, r)
}

// WriteTo copies the connection into w through Read.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	return io.Copy(w, onlyReader{c})
}
