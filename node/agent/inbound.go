package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// serveMesh accepts tunnels from peer agents (and from this node's own
// pods: same-node meshed traffic takes the same authenticated path).
func (a *Agent) serveMesh(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() { // RoutineInbound: one per tunnel, ends with it or ctx
			defer wg.Done()
			a.serveTunnel(ctx, c)
		}()
	}
	wg.Wait()
	return nil
}

// serverConfig presents the identity the client asked for by SNI, if a
// local pod has it, and requires a client certificate under the anchors.
func (a *Agent) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			for _, p := range a.localIdentities() {
				if p.DNSName(a.cfg.ControlNamespace) == hello.ServerName {
					return a.certs.ServerConfig(p, nil), nil
				}
			}
			a.metrics.errors.WithLabelValues("unknown_server_name").Inc()
			return nil, fmt.Errorf("no local pod serves %q", hello.ServerName)
		},
	}
}

func (a *Agent) localIdentities() []spiffe.ID {
	a.local.mu.RLock()
	defer a.local.mu.RUnlock()
	var ids []spiffe.ID
	for _, p := range a.local.byContainer {
		ids = append(ids, p.id)
	}
	return ids
}

func (a *Agent) serveTunnel(ctx context.Context, raw net.Conn) {
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Server(raw, a.serverConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		a.metrics.errors.WithLabelValues("handshake").Inc()
		a.log.Info("tunnel handshake refused", "peer", raw.RemoteAddr().String(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	clientID, err := spiffe.FromCertificate(cs.PeerCertificates[0])
	if err != nil {
		a.metrics.errors.WithLabelValues("handshake").Inc()
		return
	}
	h, err := tunnel.ReadHeader(tc)
	if err != nil {
		a.metrics.errors.WithLabelValues("bad_header").Inc()
		_ = tunnel.WriteReply(tc, tunnel.ReasonBadHeader)
		a.log.Info("tunnel header refused", "peer", raw.RemoteAddr().String(), "client_id", clientID.String(), "err", err)
		return
	}
	refuse := func(r tunnel.Reason, msg string) {
		a.metrics.errors.WithLabelValues("refused_" + r.String()).Inc()
		a.log.Warn("tunnel refused", "reason", r.String(), "client_id", clientID.String(), "src", h.Src.String(), "dst", h.Dst.String(), "detail", msg)
		_ = tunnel.WriteReply(tc, r)
	}
	// A pod speaks only as itself: the claimed source must be a pod with
	// the client certificate's identity.
	src := a.cluster.byAddr(h.Src)
	if src == nil || a.identity(src.Namespace, serviceAccount(src)) != clientID {
		refuse(tunnel.ReasonSourceNotOwned, "source address is not a pod of the client identity")
		return
	}
	dst := a.local.addr(h.Dst.Addr())
	if dst == nil || dst.id.DNSName(a.cfg.ControlNamespace) != cs.ServerName {
		refuse(tunnel.ReasonUnknownDestination, "destination is not a local meshed pod with the requested identity")
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	podConn, err := a.stack.DialTCP(dctx, dst.nic, netip.AddrPortFrom(h.Src, 0), h.Dst)
	cancel()
	if err != nil {
		refuse(tunnel.ReasonDialFailed, err.Error())
		return
	}
	defer podConn.Close()
	if err := tunnel.WriteReply(tc, tunnel.ReasonNone); err != nil {
		return
	}
	_ = raw.SetDeadline(time.Time{})
	a.metrics.opened.WithLabelValues("inbound").Inc()
	start := time.Now()
	stats, err := tunnel.Splice(ctx, tc, podConn, tunnel.SpliceOptions{IdleTimeout: time.Hour})
	a.metrics.closed.WithLabelValues("inbound").Inc()
	a.metrics.bytes.WithLabelValues("inbound", "received").Add(float64(stats.AToB))
	a.metrics.bytes.WithLabelValues("inbound", "sent").Add(float64(stats.BToA))
	if err != nil && !errors.Is(err, context.Canceled) {
		a.log.Debug("inbound tunnel ended", "err", err)
	}
	a.log.Info("connection closed", "direction", "inbound", "dst_pod", dst.namespace+"/"+dst.name, "client_id", clientID.String(),
		"server_id", dst.id.String(), "src", h.Src.String(), "tls", true, "bytes_in", stats.AToB, "bytes_out", stats.BToA, "duration", time.Since(start))
}
