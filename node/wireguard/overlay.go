package wireguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Dead-peer detection on overlay tunnel connections, as the underlay's
// tunnel.DetectDeadPeer does with kernel sockets: keepalives while idle,
// and a connection whose bytes stay unacknowledged for userTimeout fails.
const (
	keepaliveIdle     = 15 * time.Second
	keepaliveInterval = 5 * time.Second
	keepaliveCount    = 3
	userTimeout       = 20 * time.Second
)

// dialOverlay opens a TCP connection through the overlay stack.
func dialOverlay(ctx context.Context, s *stack.Stack, dst netip.AddrPort) (net.Conn, error) {
	var wq waiter.Queue
	ep, tcpipErr := s.NewEndpoint(tcp.ProtocolNumber, ipv6.ProtocolNumber, &wq)
	if tcpipErr != nil {
		return nil, fmt.Errorf("overlay endpoint: %s", tcpipErr)
	}
	if err := setDeadPeerOptions(ep); err != nil {
		ep.Close()
		return nil, err
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	remote := tcpip.FullAddress{NIC: overlayNIC, Addr: tcpip.AddrFrom16(dst.Addr().As16()), Port: dst.Port()}
	tcpipErr = ep.Connect(remote)
	if _, ok := tcpipErr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, fmt.Errorf("dial overlay %s: %w", dst, ctx.Err())
		case <-notify:
		}
		tcpipErr = ep.LastError()
	}
	if tcpipErr != nil {
		ep.Close()
		return nil, fmt.Errorf("dial overlay %s: %s", dst, tcpipErr)
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

func setDeadPeerOptions(ep tcpip.Endpoint) error {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepaliveIdle)
	intvl := tcpip.KeepaliveIntervalOption(keepaliveInterval)
	ut := tcpip.TCPUserTimeoutOption(userTimeout)
	for _, o := range []tcpip.SettableSocketOption{&idle, &intvl, &ut} {
		if tcpipErr := ep.SetSockOpt(o); tcpipErr != nil {
			return fmt.Errorf("overlay socket option %T: %s", o, tcpipErr)
		}
	}
	if tcpipErr := ep.SetSockOptInt(tcpip.KeepaliveCountOption, keepaliveCount); tcpipErr != nil {
		return fmt.Errorf("overlay keepalive count: %s", tcpipErr)
	}
	return nil
}

// ErrUnknownOverlayPeer: a connection came from an overlay address that
// is no configured peer's (a peer removed meanwhile).
var ErrUnknownOverlayPeer = errors.New("connection from an overlay address of no peer")

// overlayListener accepts mesh tunnels on the overlay address. Each
// connection's RemoteAddr is the node address of the peer whose overlay
// address it came from, so the tunnel server's check that a source pod
// runs on the node the tunnel comes from works unchanged. wireguard-go
// only lets a peer use its own overlay address as a source, and a peer's
// overlay address is bound to its node address (ParsePublished).
type overlayListener struct {
	net.Listener
	nodeOf  func(overlay netip.Addr) (netip.Addr, bool)
	refused func() // counts a connection from an unknown overlay address
}

func (l *overlayListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ta, ok := c.RemoteAddr().(*net.TCPAddr)
		if !ok {
			c.Close()
			continue
		}
		ap := ta.AddrPort()
		node, ok := l.nodeOf(ap.Addr())
		if !ok {
			c.Close()
			if l.refused != nil {
				l.refused()
			}
			continue
		}
		return &nodeConn{Conn: c, remote: net.TCPAddrFromAddrPort(netip.AddrPortFrom(node, ap.Port()))}, nil
	}
}

// nodeConn is an overlay connection seen as coming from a node address.
type nodeConn struct {
	net.Conn
	remote net.Addr
}

func (c *nodeConn) RemoteAddr() net.Addr { return c.remote }

// CloseWrite keeps half-close working through the wrapper.
func (c *nodeConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// underlayListener is the mesh listener on the node address with
// transport wireguard: it refuses tunnels from nodes that publish a
// WireGuard key (they must come over the overlay; during a rollout, nodes
// without a key yet still reach this one on the underlay).
type underlayListener struct {
	net.Listener
	route   func(node netip.Addr) (Route, netip.Addr)
	refused func() // counts a refused connection
}

func (l *underlayListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ta, ok := c.RemoteAddr().(*net.TCPAddr)
		if !ok {
			return c, nil
		}
		if r, _ := l.route(ta.AddrPort().Addr().Unmap()); r != RouteUnderlay {
			c.Close()
			if l.refused != nil {
				l.refused()
			}
			continue
		}
		return c, nil
	}
}

// listenOverlay listens on the overlay address.
func listenOverlay(s *stack.Stack, overlay netip.Addr, port int) (net.Listener, error) {
	ln, err := gonet.ListenTCP(s, tcpip.FullAddress{NIC: overlayNIC, Addr: tcpip.AddrFrom16(overlay.As16()), Port: uint16(port)}, ipv6.ProtocolNumber)
	if err != nil {
		return nil, fmt.Errorf("listen on overlay %s port %d: %w", overlay, port, err)
	}
	return ln, nil
}
