package inbound

import (
	"net"
	"net/netip"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// inboundFlow is a delivered stream's entry in the connection accounting
// (Config.Flows); the zero value (no accounting) does nothing.
type inboundFlow struct{ t *flowlog.Track }

// trackInbound records a stream delivered to dst (the server side of a
// meshed connection) and wraps the pod's connection for the HTTP/1
// observer when metrics or a tap want it.
func (a *Acceptor) trackInbound(req Request, dst *pods.Pod, podConn net.Conn) (inboundFlow, net.Conn) {
	if a.cfg.Flows == nil {
		return inboundFlow{}, podConn
	}
	t := a.cfg.Flows.Open(flowlog.Conn{
		// The pod sees the client pod's address with a port of the
		// stack's choosing (podConn's local end).
		Proxy: flowlog.In, Src: srcOf(podConn, req), Dst: req.Header.Dst, TLS: flowlog.TLSTrue,
		ClientID: req.ClientID.String(), ServerID: dst.ID.String(), Peer: req.Peer, Tunnel: req.Tunnel,
	})
	// The pod's connection reads the server's bytes.
	return inboundFlow{t}, t.Observe(podConn, false)
}

// srcOf is the client's address as the pod sees it: podConn's local end,
// else the header's source.
func srcOf(podConn net.Conn, req Request) netip.AddrPort {
	if t, ok := podConn.LocalAddr().(*net.TCPAddr); ok {
		if ap := t.AddrPort(); ap.IsValid() {
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	return netip.AddrPortFrom(req.Header.Src, 0)
}

// close records the end: stats.AToB went from the tunnel (client) to the
// pod (server).
func (f inboundFlow) close(stats tunnel.SpliceStats, err error) {
	if f.t == nil {
		return
	}
	f.t.Close(stats.AToB, stats.BToA, tunnel.EndOf(err))
}
