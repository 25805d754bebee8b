// Package inbound accepts mesh tunnels from peer agents (and from this
// node's own pods: same-node meshed traffic takes the same authenticated
// path), checks them (who accepts and checks), and delivers each into the
// destination pod's NIC with the client pod's address as source.
package inbound

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/rawio"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
)

// LocalPods finds local meshed pods.
type LocalPods interface {
	ByAddr(netip.Addr) *pods.Pod
	Identities() []spiffe.ID
}

// Cluster finds the pods holding an address, cluster-wide
// (clusterview.View).
type Cluster interface {
	PodsByAddr(netip.Addr) ([]*corev1.Pod, error)
	// Changed returns a channel closed at the view's next pod event.
	Changed() <-chan struct{}
}

// ServerConfigs makes the TLS server configuration of a local identity
// (workload.Manager).
type ServerConfigs interface {
	ServerConfig(local spiffe.ID, authorize func(spiffe.ID) error) *tls.Config
}

// PodDialer dials into a pod's NIC with a spoofed source (netstack.Stack).
type PodDialer interface {
	DialTCP(ctx context.Context, id netstack.NICID, src, dst netip.AddrPort) (net.Conn, error)
}

// Authorizer applies the destination pod's inbound policy (NetworkPolicy
// ingress, default inbound policy, Authorizations: node/authz through the
// agent) to a request whose source and destination Check has verified.
type Authorizer interface {
	// AuthorizeInbound judges the request from the verified source pod
	// src to the local pod dst. known is false while the agent cannot tell
	// (policies not synced, a lookup failed): the check then waits as for
	// a source the view does not know yet, and refuses at the bound. A
	// denial is counted and logged by the Authorizer.
	AuthorizeInbound(r Request, src *corev1.Pod, dst *pods.Pod) (allowed, known bool, detail string)
}

// Config is the node-wide part of the checks, and the listener's limits
// (zero means the default), so that one peer, or a flood of garbage to
// :4143, cannot take the node's agent down.
type Config struct {
	TrustDomain      string
	ControlNamespace string
	// Authorizer applies policies to every checked stream; nil authorizes
	// everything (tests of other parts; the agent always sets it).
	Authorizer Authorizer
	// Flows is the connection accounting (edges, tap, per-workload
	// metrics: flows.go); nil records nothing.
	Flows *flowlog.Log
	// Go, if set, starts the per-stream goroutines (the stream handler,
	// its drainer, the on-demand copy of the pod's bytes: mux.Config.Go,
	// tunnel.SpliceOptions.Go; a worker pool). nil: goroutines of their
	// own.
	Go func(func())
	// MaxConns caps open tunnel connections node-wide (default 16384);
	// MaxConnsPerPeer those from one peer address (default 4096).
	MaxConns, MaxConnsPerPeer int
	// MaxSessionsPerPeer caps the version 3 connections from one peer
	// address (default 256; they count against MaxConnsPerPeer too). The
	// peer's pool keeps one connection per identity pair in use (a few
	// for a busy pair), and each may hold up to mux.ConnWindow received
	// bytes: a version 3 connection is worth far more than a version 2
	// one.
	MaxSessionsPerPeer int
	// MaxHandshakes caps connections between accept and a checked header
	// node-wide (default 256); MaxHandshakesPerPeer from one peer
	// (default 64).
	MaxHandshakes, MaxHandshakesPerPeer int
	// MaxStreams caps meshed connections delivered at once node-wide
	// (default 65536), MaxStreamsPerPeer those from one peer address
	// (default 16384): a version 3 connection carries many, a version 2
	// connection one. MaxStreamsPerConn caps one version 3 connection's
	// (default mux.DefaultMaxStreams). Past a cap a stream is refused
	// (ReasonBusy) and counted; its connection goes on.
	MaxStreams, MaxStreamsPerPeer, MaxStreamsPerConn int
	// SessionIdle closes a version 3 connection that has had no stream
	// for that long (default 3 minutes: the peer's pool closes its idle
	// connections after 1 minute, and should be the one to). FirstOpen
	// closes one whose first stream has not come within it of the
	// handshake (default 10s, as version 2 bounds the header).
	SessionIdle, FirstOpen time.Duration
	// SourceWait bounds how long a tunnel whose claimed source is not
	// known to the cluster view yet waits for the view to learn it
	// (default 8s). A pod's first instruction may run before its kubelet
	// has reported status.podIP (a Job calling a Service at once), and a
	// peer agent knows its pod from CNI ADD, before the API does.
	SourceWait time.Duration
}

func (c *Config) defaults() {
	if c.MaxConns == 0 {
		c.MaxConns = 16384
	}
	if c.MaxConnsPerPeer == 0 {
		c.MaxConnsPerPeer = 4096
	}
	if c.MaxSessionsPerPeer == 0 {
		c.MaxSessionsPerPeer = 256
	}
	if c.MaxHandshakes == 0 {
		c.MaxHandshakes = 256
	}
	if c.MaxHandshakesPerPeer == 0 {
		c.MaxHandshakesPerPeer = 64
	}
	if c.MaxStreams == 0 {
		c.MaxStreams = 65536
	}
	if c.MaxStreamsPerPeer == 0 {
		c.MaxStreamsPerPeer = 16384
	}
	if c.MaxStreamsPerConn == 0 {
		c.MaxStreamsPerConn = mux.DefaultMaxStreams
	}
	if c.SessionIdle == 0 {
		c.SessionIdle = 3 * time.Minute
	}
	if c.FirstOpen == 0 {
		c.FirstOpen = 10 * time.Second
	}
	if c.SourceWait == 0 {
		c.SourceWait = 8 * time.Second
	}
}

// Acceptor serves the mesh listener.
type Acceptor struct {
	cfg     Config
	local   LocalPods
	cluster Cluster
	certs   ServerConfigs
	stack   PodDialer
	metrics *nodemetrics.Metrics
	log     *slog.Logger

	serving atomic.Bool
	failed  atomic.Pointer[error]

	conns      counters // open tunnel connections
	sessions   counters // open version 3 connections
	handshakes counters // connections not past their handshake (v3) or header (v2) yet
	streams    counters // meshed connections being checked or delivered
}

// counters counts per peer and in total. Safe for concurrent use.
type counters struct {
	mu     sync.Mutex // guards the fields below
	total  int
	byPeer map[netip.Addr]int
}

// acquire counts one for peer unless that would pass a cap; which tells
// which cap was hit ("" when acquired).
func (c *counters) acquire(peer netip.Addr, max, maxPerPeer int) (which string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.total >= max {
		return "node"
	}
	if c.byPeer[peer] >= maxPerPeer {
		return "peer"
	}
	if c.byPeer == nil {
		c.byPeer = map[netip.Addr]int{}
	}
	c.total++
	c.byPeer[peer]++
	return ""
}

func (c *counters) release(peer netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total--
	if c.byPeer[peer]--; c.byPeer[peer] <= 0 {
		delete(c.byPeer, peer)
	}
}

// New checks its dependencies.
func New(cfg Config, local LocalPods, cluster Cluster, certs ServerConfigs, stack PodDialer, m *nodemetrics.Metrics, log *slog.Logger) (*Acceptor, error) {
	if local == nil || cluster == nil || certs == nil || stack == nil || m == nil || log == nil {
		return nil, errors.New("inbound acceptor: nil dependency")
	}
	if cfg.TrustDomain == "" || cfg.ControlNamespace == "" {
		return nil, errors.New("inbound acceptor: trust domain and control namespace are required")
	}
	cfg.defaults()
	return &Acceptor{cfg: cfg, local: local, cluster: cluster, certs: certs, stack: stack, metrics: m, log: log}, nil
}

// Serve accepts tunnels on ln until ctx ends. It never stops silently:
// temporary Accept errors (out of fds, aborted handshakes) back off and
// retry, as net/http does; any other error stops the listener, fails
// Ready, and is returned.
func (a *Acceptor) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	a.serving.Store(true)
	defer a.serving.Store(false)
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if temporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				a.metrics.Errors.WithLabelValues("accept_temporary").Inc()
				a.log.Warn("mesh listener: accept failed, retrying", "err", err, "backoff", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			err = fmt.Errorf("accept mesh tunnels: %w", err)
			a.failed.Store(&err)
			return err
		}
		backoff = 0
		wg.Add(1)
		go func() { // RoutineInbound: one per tunnel, ends with it or ctx
			defer wg.Done()
			a.serveTunnel(ctx, c)
		}()
	}
}

// temporary reports Accept errors worth retrying.
func temporary(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Ready reports whether the listener is serving: nil while it is, an
// error before Serve and after it stopped.
func (a *Acceptor) Ready() error {
	if p := a.failed.Load(); p != nil {
		return *p
	}
	if !a.serving.Load() {
		return errors.New("mesh listener not serving")
	}
	return nil
}

// serverConfig presents the identity the client asked for by SNI, if a
// local pod has it, and requires a client certificate under the anchors.
func (a *Acceptor) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			for _, id := range a.local.Identities() {
				if id.DNSName(a.cfg.ControlNamespace) == hello.ServerName {
					cfg := a.certs.ServerConfig(id, nil)
					// A version 3 client offers mux.ALPN; a version 2
					// client offers nothing and gets version 2.
					cfg.NextProtos = []string{mux.ALPN}
					// Full-size records from the first byte (crypto/tls
					// would start small and grow until 128 KiB are sent).
					cfg.DynamicRecordSizingDisabled = true
					return cfg, nil
				}
			}
			a.metrics.Errors.WithLabelValues("unknown_server_name").Inc()
			return nil, fmt.Errorf("no local pod serves %q", hello.ServerName)
		},
	}
}

// Request is what a tunnel asks for, as the checks see it.
type Request struct {
	ClientID   spiffe.ID  // from the verified client certificate
	ServerName string     // SNI: the identity the client expects
	Peer       netip.Addr // the address the tunnel came from
	Header     tunnel.Header
	// Tunnel is the carrying TCP connection's 4-tuple (this node's end,
	// the peer's), for the accounting (capture --side wire).
	Tunnel [2]netip.AddrPort
}

// Check decides whether a tunnel may be delivered. A pod speaks only as
// itself: the claimed source address must be held by exactly one pod (a
// terminating pod that still holds a reused IP does not count next to a
// live one), with the client certificate's identity, running on the node
// the tunnel comes from (a certificate for prod/default on node A does not
// let A speak for a prod/default pod on node B). The destination must be a
// local meshed pod with the identity the client asked for. Check returns
// the destination pod, or the refusal reason and a detail for the log.
// Then Config.Authorizer applies the destination's inbound policy
// (ReasonPolicy).
func (a *Acceptor) Check(r Request) (*pods.Pod, tunnel.Reason, string) {
	dst, reason, detail, _ := a.check(r)
	return dst, reason, detail
}

// check is Check, and also tells whether a refusal is because the view
// does not know the source yet (so that waiting for the view may change
// the answer): the lookup failed (not synced), no pod or two live pods
// hold the address, or its only holder is terminating (its successor's IP
// not reported yet). A live, sole holder of another identity or on another
// node is a definite refusal.
func (a *Acceptor) check(r Request) (dst *pods.Pod, reason tunnel.Reason, detail string, unknown bool) {
	srcPods, err := a.cluster.PodsByAddr(r.Header.Src)
	if err != nil {
		return nil, tunnel.ReasonSourceNotOwned, fmt.Sprintf("source lookup: %v", err), true
	}
	src := clusterview.Holder(srcPods)
	switch {
	case src == nil:
		return nil, tunnel.ReasonSourceNotOwned, fmt.Sprintf("no single live pod holds the source address (%d candidates)", len(srcPods)), true
	case a.identity(src) != r.ClientID:
		return nil, tunnel.ReasonSourceNotOwned, fmt.Sprintf("source pod %s/%s runs as %s, not as the client identity", src.Namespace, src.Name, a.identity(src)), src.DeletionTimestamp != nil
	case !onNode(src, r.Peer):
		return nil, tunnel.ReasonSourceNotOwned, fmt.Sprintf("source pod %s/%s runs on node %s, the tunnel comes from %s", src.Namespace, src.Name, src.Status.HostIP, r.Peer), src.DeletionTimestamp != nil
	}
	dst = a.local.ByAddr(r.Header.Dst.Addr())
	if dst == nil || dst.ID.DNSName(a.cfg.ControlNamespace) != r.ServerName {
		return nil, tunnel.ReasonUnknownDestination, "destination is not a local meshed pod with the requested identity", false
	}
	if a.cfg.Authorizer != nil {
		allowed, known, detail := a.cfg.Authorizer.AuthorizeInbound(r, src, dst)
		if !known {
			return nil, tunnel.ReasonPolicy, "policy: " + detail, true
		}
		if !allowed {
			return nil, tunnel.ReasonPolicy, "policy: " + detail, false
		}
	}
	return dst, tunnel.ReasonNone, "", false
}

// SyncWaiter is optionally implemented by an Authorizer: PoliciesSynced
// returns a channel closed once its policies have synced, so that
// CheckWait, waiting while the Authorizer cannot tell, wakes at the sync
// rather than at its bound (review finding 10: streams that arrived right
// after an agent start waited the whole bound, then were refused).
type SyncWaiter interface {
	PoliciesSynced() <-chan struct{}
}

// policiesSynced is the Authorizer's sync channel while it is still open,
// else nil (a closed one would wake every wait at once).
func (a *Acceptor) policiesSynced() <-chan struct{} {
	w, ok := a.cfg.Authorizer.(SyncWaiter)
	if !ok {
		return nil
	}
	c := w.PoliciesSynced()
	select {
	case <-c:
		return nil
	default:
		return c
	}
}

// CheckWait is Check that, while the only trouble is a source the cluster
// view does not know yet (or an Authorizer that cannot tell yet), waits
// for the view to learn it (woken by its pod events and the policies'
// sync, bounded by SourceWait and ctx) and runs the whole check again.
// It fails closed: still unknown at the bound is a refusal. waited is how
// long it waited (zero when the first check decided).
func (a *Acceptor) CheckWait(ctx context.Context, r Request) (dst *pods.Pod, reason tunnel.Reason, detail string, waited time.Duration) {
	start := time.Now()
	var timeout <-chan time.Time
	for {
		changed := a.cluster.Changed() // before the check: an event between the two wakes us
		synced := a.policiesSynced()
		dst, reason, detail, unknown := a.check(r)
		if reason == tunnel.ReasonNone || !unknown {
			if timeout != nil {
				waited = time.Since(start)
			}
			return dst, reason, detail, waited
		}
		if timeout == nil {
			t := time.NewTimer(a.cfg.SourceWait)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-changed:
		case <-synced:
		case <-timeout:
			return dst, reason, detail + fmt.Sprintf(" (still unknown after waiting %s for the cluster view)", a.cfg.SourceWait), time.Since(start)
		case <-ctx.Done():
			return dst, reason, detail + " (cancelled: agent stopping or tunnel stream reset)", time.Since(start)
		}
	}
}

// onNode reports whether the pod's node has address peer.
func onNode(p *corev1.Pod, peer netip.Addr) bool {
	if !peer.IsValid() {
		return false
	}
	for _, h := range p.Status.HostIPs {
		if a, err := netip.ParseAddr(h.IP); err == nil && a.Unmap() == peer {
			return true
		}
	}
	a, err := netip.ParseAddr(p.Status.HostIP)
	return err == nil && a.Unmap() == peer
}

func (a *Acceptor) identity(p *corev1.Pod) spiffe.ID {
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return spiffe.ID{TrustDomain: a.cfg.TrustDomain, Namespace: p.Namespace, ServiceAccount: sa}
}

func (a *Acceptor) serveTunnel(ctx context.Context, raw net.Conn) {
	defer raw.Close()
	var peer netip.Addr
	if ta, ok := raw.RemoteAddr().(*net.TCPAddr); ok {
		peer = ta.AddrPort().Addr().Unmap()
	}
	if which := a.conns.acquire(peer, a.cfg.MaxConns, a.cfg.MaxConnsPerPeer); which != "" {
		a.metrics.Errors.WithLabelValues("limit_conns_" + which).Inc()
		return
	}
	defer a.conns.release(peer)
	if which := a.handshakes.acquire(peer, a.cfg.MaxHandshakes, a.cfg.MaxHandshakesPerPeer); which != "" {
		a.metrics.Errors.WithLabelValues("limit_handshakes_" + which).Inc()
		return
	}
	handshaking := true
	defer func() {
		if handshaking {
			a.handshakes.release(peer)
		}
	}()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	tcp, _ := raw.(*net.TCPConn)
	// Raw reads and writes: an idle agent's first message does not wake
	// the runtime's sysmon (see package rawio).
	raw = rawio.Wrap(raw)
	tc := tls.Server(raw, a.serverConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		a.metrics.Errors.WithLabelValues("handshake").Inc()
		a.log.Info("tunnel handshake refused", "peer", raw.RemoteAddr().String(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	clientID, err := spiffe.FromCertificate(cs.PeerCertificates[0])
	if err != nil {
		a.metrics.Errors.WithLabelValues("handshake").Inc()
		return
	}
	if cs.NegotiatedProtocol == mux.ALPN {
		if tcp != nil {
			// A pooled connection must notice a client agent that vanished.
			if err := tunnel.DetectDeadPeer(tcp); err != nil {
				a.log.Warn("tunnel connection: dead-peer detection not set", "peer", peer.String(), "err", err)
			}
		}
		handshaking = false
		a.handshakes.release(peer)
		if which := a.sessions.acquire(peer, a.cfg.MaxConns, a.cfg.MaxSessionsPerPeer); which != "" {
			a.metrics.Errors.WithLabelValues("limit_sessions_" + which).Inc()
			return
		}
		defer a.sessions.release(peer)
		_ = raw.SetDeadline(time.Time{})
		a.metrics.Handshakes.WithLabelValues("inbound", "v3").Inc()
		a.ServeSession(ctx, tc, clientID, cs.ServerName, peer)
		return
	}
	a.metrics.Handshakes.WithLabelValues("inbound", "v2").Inc()
	h, err := tunnel.ReadHeader(tc)
	if err != nil {
		a.metrics.Errors.WithLabelValues("bad_header").Inc()
		_ = tunnel.WriteReply(tc, tunnel.ReasonBadHeader)
		a.log.Info("tunnel header refused", "peer", raw.RemoteAddr().String(), "client_id", clientID.String(), "err", err)
		return
	}
	handshaking = false
	a.handshakes.release(peer)
	req := Request{ClientID: clientID, ServerName: cs.ServerName, Peer: peer, Header: h, Tunnel: flowlog.TunnelOf(raw)}
	if which := a.streams.acquire(peer, a.cfg.MaxStreams, a.cfg.MaxStreamsPerPeer); which != "" {
		a.metrics.Errors.WithLabelValues("limit_streams_" + which).Inc()
		_ = tunnel.WriteReply(tc, tunnel.ReasonBusy)
		return
	}
	defer a.streams.release(peer)
	a.deliver(ctx, req, v2Tunnel{tc: tc, raw: raw}, nil)
}

// ServeSession serves a version 3 connection (after its handshake, with
// the identities it proved) until it ends or ctx does: every stream is
// checked and delivered as a version 2 tunnel is.
func (a *Acceptor) ServeSession(ctx context.Context, conn net.Conn, clientID spiffe.ID, serverName string, peer netip.Addr) {
	a.metrics.PoolConns.WithLabelValues("inbound").Inc()
	defer a.metrics.PoolConns.WithLabelValues("inbound").Dec()
	// Streams still being checked or dialled stop with their connection.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A stream counts against MaxStreamsPerConn until its handler returns,
	// and a Reset of the stream stops its checks and its dial (its
	// Context), so an Open-then-Reset flood neither passes the cap nor
	// makes us dial pods for nobody.
	scfg := mux.Config{MaxStreams: a.cfg.MaxStreamsPerConn, Context: ctx, IdleTimeout: a.cfg.SessionIdle, FirstOpenTimeout: a.cfg.FirstOpen, Go: a.cfg.Go}
	if tc, ok := conn.(*tls.Conn); ok {
		// No stream may start after the client's certificate expires, and
		// the connection does not outlive it by more than a minute.
		scfg.Expires = earliestNotAfter(tc.ConnectionState().PeerCertificates)
	}
	sess := mux.Server(conn, scfg, func(st *mux.Stream) {
		if which := a.streams.acquire(peer, a.cfg.MaxStreams, a.cfg.MaxStreamsPerPeer); which != "" {
			a.metrics.Errors.WithLabelValues("limit_streams_" + which).Inc()
			_ = st.Refuse(tunnel.ReasonBusy)
			return
		}
		release := func() { a.streams.release(peer) }
		var h tunnel.Header
		if err := h.UnmarshalBinary(st.Payload()); err != nil {
			release()
			a.metrics.Errors.WithLabelValues("bad_header").Inc()
			_ = st.Refuse(tunnel.ReasonBadHeader)
			a.log.Info("tunnel header refused", "peer", peer.String(), "client_id", clientID.String(), "err", err)
			return
		}
		a.deliver(ctx, Request{ClientID: clientID, ServerName: serverName, Peer: peer, Header: h, Tunnel: flowlog.TunnelOf(conn)}, v3Stream{st}, release)
	})
	select {
	case <-ctx.Done():
		sess.Close()
	case <-sess.Done():
	}
	cancel()
	sess.Wait()
	switch err := sess.Err(); {
	case errors.Is(err, mux.ErrProtocol):
		// A peer agent that breaks the framing: a bug or an attack.
		a.metrics.Errors.WithLabelValues("protocol").Inc()
		a.log.Warn("tunnel connection closed on a protocol error", "peer", peer.String(), "client_id", clientID.String(), "err", err)
	case errors.Is(err, mux.ErrPeerCertExpired):
		a.metrics.Errors.WithLabelValues("peer_cert_expired").Inc()
		a.log.Info("tunnel connection closed: the client's certificate expired", "peer", peer.String(), "client_id", clientID.String())
	case errors.Is(err, mux.ErrIdle):
		// No stream for SessionIdle (or none at all within FirstOpen).
		a.metrics.Errors.WithLabelValues("session_idle").Inc()
		a.log.Debug("tunnel connection closed: idle", "peer", peer.String(), "client_id", clientID.String())
	case err != nil && !errors.Is(err, mux.ErrSessionClosed):
		// The peer closed it (idle) or its agent went away.
		a.log.Debug("tunnel connection ended", "peer", peer.String(), "client_id", clientID.String(), "err", err)
	}
}

// earliestNotAfter is when the first certificate of chain expires (zero
// for none).
func earliestNotAfter(chain []*x509.Certificate) time.Time {
	var t time.Time
	for _, c := range chain {
		if t.IsZero() || c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

// answerer is how deliver answers a tunnel of either version.
type answerer interface {
	// accept answers ReplyOK and returns the connection to splice.
	accept() (net.Conn, error)
	refuse(tunnel.Reason)
	// setDeadline bounds the answer (version 2's connection); zero clears.
	setDeadline(time.Time)
	// setupContext is what bounds the checks and the dial into the pod:
	// ctx, or less (a version 3 stream's ends when the client resets it).
	setupContext(ctx context.Context) context.Context
	// hold lets the delivering goroutine return while the connection is
	// spliced (a version 3 stream: mux.Stream.Hold); ok false: splice on
	// it until the end.
	hold() (release func(), ok bool)
}

type v2Tunnel struct {
	tc  *tls.Conn
	raw net.Conn
}

func (t v2Tunnel) accept() (net.Conn, error) {
	if err := tunnel.WriteReply(t.tc, tunnel.ReasonNone); err != nil {
		return nil, err
	}
	_ = t.raw.SetDeadline(time.Time{})
	return tunnel.NewFramedConn(t.tc), nil
}
func (t v2Tunnel) refuse(r tunnel.Reason)   { _ = tunnel.WriteReply(t.tc, r) }
func (t v2Tunnel) setDeadline(tm time.Time) { _ = t.raw.SetDeadline(tm) }
func (t v2Tunnel) setupContext(ctx context.Context) context.Context {
	return ctx
}
func (t v2Tunnel) hold() (func(), bool) { return nil, false }

type v3Stream struct{ st *mux.Stream }

func (s v3Stream) accept() (net.Conn, error) {
	if err := s.st.Accept(); err != nil {
		return nil, err
	}
	return s.st, nil
}
func (s v3Stream) refuse(r tunnel.Reason) { _ = s.st.Refuse(r) }
func (s v3Stream) setDeadline(time.Time)  {}

// setupContext: the stream's Context, a child of the session's ctx.
func (s v3Stream) setupContext(context.Context) context.Context { return s.st.Context() }

// hold: the splice reports its end itself, so the stream's handler (a
// goroutine per stream) returns instead of waiting for it.
func (s v3Stream) hold() (func(), bool) { return s.st.Hold(), true }

// deliver checks a tunnel's request, dials the destination pod, answers,
// and splices until the connection ends. end (if not nil) is called once
// the connection is over: before deliver returns, or, when the tunnel
// can be held (version 3), when the splice it started in the background
// ends.
func (a *Acceptor) deliver(ctx context.Context, req Request, t answerer, end func()) {
	async := false
	defer func() {
		if !async && end != nil {
			end()
		}
	}()
	clientID, peer, h := req.ClientID, req.Peer, req.Header
	setup := t.setupContext(ctx)
	dst, reason, detail, waited := a.CheckWait(setup, req)
	if waited > 0 {
		// Counted whatever the outcome: how often sources race the API.
		a.metrics.Errors.WithLabelValues("source_wait").Inc()
		a.log.Info("tunnel waited for the cluster view to learn its source", "client_id", clientID.String(), "peer", peer.String(),
			"src", h.Src.String(), "waited", waited, "accepted", reason == tunnel.ReasonNone)
	}
	// The wait may have used the handshake deadline: the rest (reply, dial
	// into the pod) gets its own.
	t.setDeadline(time.Now().Add(10 * time.Second))
	refuse := func(r tunnel.Reason, msg string) {
		a.metrics.Errors.WithLabelValues("refused_" + r.String()).Inc()
		a.log.Warn("tunnel refused", "reason", r.String(), "client_id", clientID.String(), "peer", peer.String(), "src", h.Src.String(), "dst", h.Dst.String(), "detail", msg)
		t.refuse(r)
	}
	resetEarly := func() bool {
		if setup.Err() == nil || ctx.Err() != nil {
			return false
		}
		// The client reset the stream before our answer: nobody to answer.
		a.metrics.Errors.WithLabelValues("reset_before_reply").Inc()
		return true
	}
	if reason != tunnel.ReasonNone {
		if !resetEarly() {
			refuse(reason, detail)
		}
		return
	}
	dctx, cancel := context.WithTimeout(setup, 10*time.Second)
	podConn, err := a.stack.DialTCP(dctx, dst.NIC, netip.AddrPortFrom(h.Src, 0), h.Dst)
	cancel()
	if err != nil {
		if !resetEarly() {
			refuse(tunnel.ReasonDialFailed, err.Error())
		}
		return
	}
	tun, err := t.accept()
	if err != nil {
		abort(podConn)
		return
	}
	a.metrics.Opened.WithLabelValues("inbound").Inc()
	a.metrics.Active.WithLabelValues("inbound").Inc()
	start := time.Now()
	flow, podConn := a.trackInbound(req, dst, podConn)
	opts := tunnel.SpliceOptions{IdleTimeout: time.Hour, Go: a.cfg.Go}
	if release, ok := t.hold(); ok {
		async = true
		tunnel.SpliceAsync(ctx, tun, podConn, opts, func(stats tunnel.SpliceStats, err error) {
			defer release()
			a.spliced(req, dst, flow, start, stats, err)
			if end != nil {
				end()
			}
		})
		return
	}
	stats, err := tunnel.Splice(ctx, tun, podConn, opts)
	a.spliced(req, dst, flow, start, stats, err)
}

// spliced accounts for a delivered connection that ended.
func (a *Acceptor) spliced(req Request, dst *pods.Pod, flow inboundFlow, start time.Time, stats tunnel.SpliceStats, err error) {
	clientID, h := req.ClientID, req.Header
	flow.close(stats, err)
	a.metrics.Active.WithLabelValues("inbound").Dec()
	a.metrics.Closed.WithLabelValues("inbound").Inc()
	a.metrics.Ends.WithLabelValues("inbound", tunnel.EndOf(err)).Inc()
	a.metrics.Bytes.WithLabelValues("inbound", "received").Add(float64(stats.AToB))
	a.metrics.Bytes.WithLabelValues("inbound", "sent").Add(float64(stats.BToA))
	if err != nil && !errors.Is(err, context.Canceled) {
		a.log.Debug("inbound tunnel ended", "err", err)
	}
	a.log.Debug("connection closed", "direction", "inbound", "dst_pod", dst.FullName(), "client_id", clientID.String(),
		"server_id", dst.ID.String(), "src", h.Src.String(), "tls", true, "bytes_in", stats.AToB, "bytes_out", stats.BToA, "duration", time.Since(start), "end", tunnel.EndOf(err))
}

// abort resets conn (a netstack.Conn) so the pod sees an error.
func abort(conn net.Conn) {
	if a, ok := conn.(interface{ Abort() }); ok {
		a.Abort()
		return
	}
	conn.Close()
}
