package flowlog

import (
	"errors"
	"net"
	"testing"
)

// halfCloser records what the observer called on the connection it wraps.
type halfCloser struct {
	nopConn
	closeWrites, closes int
}

func (c *halfCloser) CloseWrite() error { c.closeWrites++; return nil }
func (c *halfCloser) Close() error      { c.closes++; return nil }

// noHalfClose is a connection without CloseWrite.
type noHalfClose struct {
	net.Conn
	closes int
}

func (c *noHalfClose) Close() error { c.closes++; return nil }

// TestObservedCloseWrite: the observer passes a half-close on, and on a
// connection that cannot half-close reports errors.ErrUnsupported instead
// of closing it (a full close would fail the other direction's reads with
// net.ErrClosed, which a splice takes for a cut).
func TestObservedCloseWrite(t *testing.T) {
	track := New(nil, nil, Options{HTTP: true}).Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})

	hc := &halfCloser{}
	c := track.Observe(hc, true).(interface{ CloseWrite() error })
	if err := c.CloseWrite(); err != nil || hc.closeWrites != 1 || hc.closes != 0 {
		t.Fatalf("CloseWrite = %v; %d half-closes, %d closes; want nil, 1, 0", err, hc.closeWrites, hc.closes)
	}

	nh := &noHalfClose{Conn: &nopConn{}}
	c = track.Observe(nh, true).(interface{ CloseWrite() error })
	if err := c.CloseWrite(); !errors.Is(err, errors.ErrUnsupported) || nh.closes != 0 {
		t.Fatalf("CloseWrite without half-close = %v with %d closes; want errors.ErrUnsupported and no close", err, nh.closes)
	}
}
