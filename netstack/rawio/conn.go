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

	wmu   sync.Mutex // one Write at a time
	wbuf  []byte
	wn    int
	werr  error
	wcall func(fd uintptr) bool
}

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

// Write implements net.Conn: all of p, or an error.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
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
