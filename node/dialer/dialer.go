// Package dialer opens the mesh tunnel to a destination node's agent: TCP to
// its mesh port, mTLS with the SOURCE pod's certificate and the destination
// pod's identity expected (and asked for by SNI), then the tunnel header and
// the server's reply. It decides nothing: the outbound decision hands it a
// complete target.
package dialer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// ClientConfigs makes the TLS client configuration for a local identity
// that expects a peer identity (workload.Manager).
type ClientConfigs interface {
	ClientConfig(local, want spiffe.ID) *tls.Config
}

// Target is one tunnel to open.
type Target struct {
	SrcID   spiffe.ID      // the source pod's identity (client certificate)
	Src     netip.AddrPort // the source pod's address (header)
	Dst     netip.AddrPort // the destination pod's address (header)
	DstID   spiffe.ID      // the destination pod's identity (expected server)
	DstNode netip.Addr     // the node agent to dial
}

// Dialer opens tunnels. The zero value is not usable; fill every field.
type Dialer struct {
	Certs            ClientConfigs
	MeshPort         int
	ControlNamespace string
	// Timeout bounds dial, handshake and sending the header (default 10s).
	Timeout time.Duration
	// ReplyTimeout bounds the wait for the server's reply (default 20s):
	// the server may wait for its cluster view to learn the source pod
	// (inbound.Config.SourceWait, 8s) and then dial the destination pod
	// (10s), so the client must outwait both.
	ReplyTimeout time.Duration
	// LocalAddr, when valid, is the source address of tunnels: the node
	// address the peer agent checks its source pods against.
	LocalAddr netip.Addr
}

// Dial opens the tunnel for t and returns it ready for data, framed (so
// that a cut is told from a clean end). A refusal by the server is a
// *tunnel.RefusedError (wrapped).
func (d *Dialer) Dial(ctx context.Context, t Target) (*tunnel.FramedConn, error) {
	if d.Certs == nil || d.MeshPort == 0 {
		return nil, errors.New("dialer: not configured")
	}
	timeout := d.Timeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var nd net.Dialer
	if d.LocalAddr.IsValid() {
		nd.LocalAddr = &net.TCPAddr{IP: d.LocalAddr.AsSlice()}
	}
	raw, err := nd.DialContext(dctx, "tcp", net.JoinHostPort(t.DstNode.String(), strconv.Itoa(d.MeshPort)))
	if err != nil {
		return nil, fmt.Errorf("dial mesh peer %s: %w", t.DstNode, err)
	}
	cfg := d.Certs.ClientConfig(t.SrcID, t.DstID)
	cfg.ServerName = t.DstID.DNSName(d.ControlNamespace)
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(dctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake with %s: %w", t.DstNode, err)
	}
	deadline, _ := dctx.Deadline()
	_ = tc.SetDeadline(deadline)
	if err := tunnel.WriteHeader(tc, tunnel.Header{Dst: t.Dst, Src: t.Src.Addr()}); err != nil {
		raw.Close()
		return nil, err
	}
	replyTimeout := d.ReplyTimeout
	if replyTimeout == 0 {
		replyTimeout = 20 * time.Second
	}
	_ = tc.SetReadDeadline(time.Now().Add(replyTimeout))
	if err := tunnel.ReadReply(tc); err != nil {
		raw.Close()
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	return tunnel.NewFramedConn(tc), nil
}
