package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"

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
type Conn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
}

func newConn(wq *waiter.Queue, ep tcpip.Endpoint) *Conn {
	return &Conn{TCPConn: gonet.NewTCPConn(wq, ep), ep: ep}
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
	return newConn(&wq, ep), nil
}
