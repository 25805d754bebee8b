package netstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Conn is a TCP connection of the stack with a pod: a *gonet.TCPConn that
// can also be reset. gonet's Close always ends with a FIN, so a tunnel cut
// on the far side would reach the pod as a clean end of stream; SetLinger(0)
// before Close (as on a *net.TCPConn) or Abort makes it a RST instead.
//
// NotifyReadable and TryRead let a caller wait for a pod's bytes without a
// goroutine parked in Read: an idle connection then holds no stack (a
// parked reader costs 8–16 KiB of stack per connection end, and the GC
// pacer lets as much garbage again accumulate; docs/performance.md).
type Conn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	wq *waiter.Queue
	s  *Stack // for Hold
}

func newConn(s *Stack, wq *waiter.Queue, ep tcpip.Endpoint) *Conn {
	return &Conn{TCPConn: gonet.NewTCPConn(wq, ep), ep: ep, wq: wq, s: s}
}

// ErrWouldBlock is TryRead's answer when nothing is buffered, and
// TryWrite's when the send buffer is full. It has a method WouldBlock()
// bool (true), so that packages that must not import netstack (the
// tunnel's splice) can recognize it.
var ErrWouldBlock error = wouldBlockError{}

type wouldBlockError struct{}

func (wouldBlockError) Error() string    { return "netstack conn: would block" }
func (wouldBlockError) WouldBlock() bool { return true }

// Hold lets the FlowHandler's ServeConn return while the connection lives
// on (served by callbacks: NotifyReadable, a splice that reports its own
// end): Stack.Close then waits for release as it waits for ServeConn.
// ok is false once the Stack is closing (the connection is being aborted;
// serve it synchronously or drop it), and for DialTCP's connections, which
// have no ServeConn to outlive. release is idempotent; call it when
// done with the connection, after closing it.
func (c *Conn) Hold() (release func(), ok bool) {
	if c.s == nil || !c.s.enter() {
		return func() {}, false
	}
	var once sync.Once
	return func() { once.Do(c.s.exit) }, true
}

// NotifyReadable registers f, called whenever the connection may have
// become readable: bytes arrived, the pod's FIN or RST, or an error. f runs
// on the stack's goroutine that delivered the segment: it must not block
// and must not call the connection's methods (it may signal a channel or
// schedule work). Calls may be spurious. The caller registers first, then
// calls TryRead until ErrWouldBlock, then waits for f: data that arrives
// in between is never missed. cancel unregisters f; once it returns, no
// call of f is running or will start.
func (c *Conn) NotifyReadable(f func()) (cancel func()) {
	e := waiter.NewFunctionEntry(waiter.ReadableEvents, func(waiter.EventMask) { f() })
	c.wq.EventRegister(&e)
	var once sync.Once
	return func() { once.Do(func() { c.wq.EventUnregister(&e) }) }
}

// ReadReady reports whether TryRead would now return something other than
// ErrWouldBlock: bytes, the pod's FIN, a reset or another error. A splice
// starting on a new connection asks it, so that nothing runs for the
// pod's direction until its first bytes come (tunnel's readyCopy).
func (c *Conn) ReadReady() bool {
	return c.ep.Readiness(waiter.ReadableEvents)&waiter.ReadableEvents != 0
}

// TryRead reads what the connection has buffered, without waiting:
// ErrWouldBlock when there is nothing yet, io.EOF after the pod's FIN.
// It must not run concurrently with Read.
func (c *Conn) TryRead(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	w := tcpip.SliceWriter(b)
	res, tcpipErr := c.ep.Read(&w, tcpip.ReadOptions{})
	switch tcpipErr.(type) {
	case nil:
		if res.Count != 0 {
			// As gonet's Read: receive-buffer auto-tuning learns from reads.
			c.ep.ModerateRecvBuf(res.Count)
		}
		return res.Count, nil
	case *tcpip.ErrWouldBlock:
		return 0, ErrWouldBlock
	case *tcpip.ErrClosedForReceive:
		if c.failed() {
			return 0, c.resetError()
		}
		return 0, io.EOF
	}
	return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: errors.New(tcpipErr.String())}
}

// Read is gonet's Read, except that a connection that failed (the pod's
// RST, a timeout) never reads as a clean end of stream. gVisor reports a
// reset once: when a write to the pod took it first, the next read only
// sees "closed for receive", which gonet turns into io.EOF, and the tunnel
// would pass a FIN on where the pod had reset.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.TCPConn.Read(b)
	if err == io.EOF && c.failed() {
		return n, c.resetError()
	}
	return n, err
}

// failed reports whether the endpoint ended in error (reset or timed out)
// rather than with the pod's FIN.
func (c *Conn) failed() bool {
	return tcp.EndpointState(c.ep.State()) == tcp.StateError
}

func (c *Conn) resetError() error {
	return &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: syscall.ECONNRESET}
}

// TryWrite writes what the connection's send buffer takes now, without
// waiting: possibly less than len(b) (with a nil error), or nothing
// (ErrWouldBlock when the buffer is full). It lets a tunnel deliver a
// received message to the pod from the goroutine that read it, with no
// goroutine hand-off, and queue only what does not fit. It must not run
// concurrently with Write.
func (c *Conn) TryWrite(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var r bytes.Reader
	r.Reset(b)
	n, tcpipErr := c.ep.Write(&r, tcpip.WriteOptions{})
	switch tcpipErr.(type) {
	case nil:
		return int(n), nil
	case *tcpip.ErrWouldBlock:
		return 0, ErrWouldBlock
	}
	return int(n), &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: errors.New(tcpipErr.String())}
}

// SetLinger behaves as on a *net.TCPConn: sec == 0 makes Close send a
// RST and discard unsent data; sec < 0 restores the default.
func (c *Conn) SetLinger(sec int) error {
	opt := tcpip.LingerOption{}
	if sec >= 0 {
		opt.Enabled = true
		opt.Timeout = 0
		if sec > 0 {
			return errors.New("netstack conn: only linger 0 (reset) or the default is supported")
		}
	}
	c.ep.SocketOptions().SetLinger(opt)
	return nil
}

// Abort resets the connection and closes it.
func (c *Conn) Abort() {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// dialTCP is gonet.DialTCPWithBind keeping the endpoint, so the returned
// Conn can be reset.
func dialTCP(ctx context.Context, s *stack.Stack, local, remote tcpip.FullAddress, netProto tcpip.NetworkProtocolNumber) (*Conn, error) {
	var wq waiter.Queue
	ep, tcpipErr := s.NewEndpoint(tcp.ProtocolNumber, netProto, &wq)
	if tcpipErr != nil {
		return nil, fmt.Errorf("new endpoint: %s", tcpipErr)
	}
	waitEntry, notifyCh := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&waitEntry)
	defer wq.EventUnregister(&waitEntry)
	if err := ctx.Err(); err != nil {
		ep.Close()
		return nil, err
	}
	if tcpipErr := ep.Bind(local); tcpipErr != nil {
		ep.Close()
		return nil, fmt.Errorf("bind %v: %s", local.Addr, tcpipErr)
	}
	tcpipErr = ep.Connect(remote)
	if _, ok := tcpipErr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, ctx.Err()
		case <-notifyCh:
		}
		tcpipErr = ep.LastError()
	}
	if tcpipErr != nil {
		ep.Close()
		return nil, &net.OpError{Op: "connect", Net: "tcp", Err: errors.New(tcpipErr.String())}
	}
	return newConn(nil, &wq, ep), nil // not held: see Hold
}
