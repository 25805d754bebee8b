// Package tunneltest provides connections for testing code built on package
// tunnel: an in-memory pipe that can half-close, and loopback TCP and TLS 1.3
// pairs with a throwaway certificate.
package tunneltest

import (
	"net"
	"sync/atomic"
	"time"
)

// Conn is one end of Pipe. Besides net.Conn it has CloseWrite, like
// *net.TCPConn, so half-close can be tested without sockets.
type Conn struct {
	r net.Conn // read end of the pipe carrying the peer's bytes to us
	w net.Conn // write end of the pipe carrying our bytes to the peer

	closed atomic.Bool
}

// Pipe returns two connected ends. It is net.Pipe (synchronous, unbuffered,
// deadlines supported) built from two one-way net.Pipes so that each
// direction can be closed on its own:
//
//   - CloseWrite on one end makes the other end's Read return io.EOF after
//     the bytes already written; the other direction keeps working.
//   - Close on one end does that and also makes the other end's Write fail.
//   - After Close, the end's own Read and Write return net.ErrClosed.
func Pipe() (*Conn, *Conn) {
	aw, br := net.Pipe() // a -> b
	bw, ar := net.Pipe() // b -> a
	return &Conn{r: ar, w: aw}, &Conn{r: br, w: bw}
}

// Read reads bytes the peer wrote.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err != nil && c.closed.Load() {
		err = net.ErrClosed
	}
	return n, err
}

// Write writes bytes for the peer to read.
func (c *Conn) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	if err != nil && c.closed.Load() {
		err = net.ErrClosed
	}
	return n, err
}

// CloseWrite ends the direction towards the peer.
func (c *Conn) CloseWrite() error { return c.w.Close() }

// Close ends both directions. It is idempotent.
func (c *Conn) Close() error {
	c.closed.Store(true)
	c.w.Close()
	c.r.Close()
	return nil
}

// LocalAddr returns the pipe's placeholder address.
func (c *Conn) LocalAddr() net.Addr { return c.w.LocalAddr() }

// RemoteAddr returns the pipe's placeholder address.
func (c *Conn) RemoteAddr() net.Addr { return c.w.RemoteAddr() }

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	c.r.SetReadDeadline(t)
	return c.w.SetWriteDeadline(t)
}

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.r.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }
