package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/resolve"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// Why a flow is not meshed (connection accounting, metrics).
const (
	reasonNotMeshed   = "not_meshed"
	reasonSkippedPort = "skipped_port"
	reasonNoEndpoints = "no_endpoints"
	reasonUnknownSrc  = "unknown_source"
)

// target is where a terminated flow goes, decided in HandleFlow and used
// by ServeConn.
type target struct {
	src      *localPod
	dst      netip.AddrPort // pod address after service resolution
	dstID    spiffe.ID
	dstNode  netip.Addr // the node agent to dial
	endpoint *resolve.Endpoint
	decided  time.Time // when HandleFlow chose it (for sweeping)
}

// pendingFlows hands decisions from HandleFlow to ServeConn. A flow whose
// handshake never completes gets no ServeConn, so entries older than
// pendingTTL are swept when the map grows past pendingSweepAt.
type pendingFlows struct {
	mu sync.Mutex // guards m
	m  map[netstack.Flow]*target
}

const (
	pendingTTL     = time.Minute
	pendingSweepAt = 1024
)

func (p *pendingFlows) put(f netstack.Flow, t *target) {
	now := time.Now()
	t.decided = now
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.m) >= pendingSweepAt {
		for k, v := range p.m {
			if now.Sub(v.decided) > pendingTTL {
				delete(p.m, k)
			}
		}
	}
	p.m[f] = t
}

func (p *pendingFlows) take(f netstack.Flow) *target {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.m[f]
	delete(p.m, f)
	return t
}

// outbound decides on and serves flows from local pods.
type outbound struct{ a *Agent }

// HandleFlow: mesh the flow when the destination (a pod, or a ClusterIP
// resolved to a ready endpoint) is a meshed pod and neither the source's
// skip-outbound nor the destination's skip-inbound names the port.
func (o *outbound) HandleFlow(f netstack.Flow) netstack.Decision {
	a := o.a
	src := a.local.nic(f.NIC)
	if src == nil {
		return o.pass(f, reasonUnknownSrc)
	}
	t := &target{src: src, dst: f.Dst}
	if ep, isSvc, err := a.resolver.Resolve(f.Dst); isSvc {
		if err != nil {
			return o.pass(f, reasonNoEndpoints)
		}
		t.dst, t.endpoint = ep.Addr, &ep
	}
	dst := a.cluster.byAddr(t.dst.Addr())
	if dst == nil || dst.Spec.HostNetwork || dst.Status.HostIP == "" {
		return o.pass(f, reasonNotMeshed)
	}
	dpol, _ := a.policy.For(dst, a.cluster.namespace(dst.Namespace))
	if !dpol.Meshed {
		return o.pass(f, reasonNotMeshed)
	}
	if src.policy.SkipsOutbound(f.Dst.Port()) || dpol.SkipsInbound(t.dst.Port()) {
		return o.pass(f, reasonSkippedPort)
	}
	node, err := netip.ParseAddr(dst.Status.HostIP)
	if err != nil {
		return o.pass(f, reasonNotMeshed)
	}
	t.dstID, t.dstNode = a.identity(dst.Namespace, serviceAccount(dst)), node
	a.pending.put(f, t)
	return netstack.Terminate
}

// pass accounts for a flow left to the kernel: tls=false and why.
func (o *outbound) pass(f netstack.Flow, reason string) netstack.Decision {
	o.a.metrics.passthrough.WithLabelValues(reason).Inc()
	o.a.log.Debug("connection not meshed", "src", f.Src.String(), "dst", f.Dst.String(), "tls", false, "reason", reason)
	return netstack.Passthrough
}

// ServeConn carries a terminated flow to the destination node's agent.
func (o *outbound) ServeConn(ctx context.Context, conn net.Conn, f netstack.Flow) {
	a := o.a
	defer conn.Close()
	t := a.pending.take(f)
	if t == nil {
		return
	}
	if t.endpoint != nil {
		done := a.resolver.Track(*t.endpoint)
		defer done()
	}
	start := time.Now()
	tc, err := o.dial(ctx, t)
	if err != nil {
		a.metrics.errors.WithLabelValues("dial").Inc()
		a.log.Warn("mesh dial failed", "src", f.Src.String(), "dst", t.dst.String(), "identity", t.dstID.String(), "err", err)
		return
	}
	a.metrics.handshake.Observe(time.Since(start).Seconds())
	a.metrics.opened.WithLabelValues("outbound").Inc()
	stats, err := tunnel.Splice(ctx, conn, tc, tunnel.SpliceOptions{IdleTimeout: time.Hour})
	a.metrics.closed.WithLabelValues("outbound").Inc()
	a.metrics.bytes.WithLabelValues("outbound", "sent").Add(float64(stats.AToB))
	a.metrics.bytes.WithLabelValues("outbound", "received").Add(float64(stats.BToA))
	a.log.Info("connection closed", "direction", "outbound", "src_pod", t.src.namespace+"/"+t.src.name,
		"client_id", t.src.id.String(), "server_id", t.dstID.String(), "dst", t.dst.String(), "tls", true,
		"bytes_sent", stats.AToB, "bytes_received", stats.BToA, "duration", time.Since(start), "err", err)
}

// dial opens the mTLS tunnel: client certificate of the source pod, the
// destination pod's identity expected (and asked for by SNI), then the
// header and the server's reply.
func (o *outbound) dial(ctx context.Context, t *target) (*tls.Conn, error) {
	a := o.a
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, "tcp", net.JoinHostPort(t.dstNode.String(), strconv.Itoa(a.cfg.MeshPort)))
	if err != nil {
		return nil, err
	}
	cfg := a.certs.ClientConfig(t.src.id, t.dstID)
	cfg.ServerName = t.dstID.DNSName(a.cfg.ControlNamespace)
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(dctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake with %s: %w", t.dstNode, err)
	}
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tunnel.WriteHeader(tc, tunnel.Header{Dst: t.dst, Src: t.src.addrs[0]}); err != nil {
		tc.Close()
		return nil, err
	}
	if err := tunnel.ReadReply(tc); err != nil {
		tc.Close()
		var refused *tunnel.RefusedError
		if errors.As(err, &refused) {
			a.metrics.errors.WithLabelValues("refused_" + refused.Reason.String()).Inc()
		}
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	return tc, nil
}
