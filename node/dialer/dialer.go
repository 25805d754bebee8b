// Package dialer opens mesh tunnels to destination nodes' agents: TCP to
// the mesh port, mTLS with the SOURCE pod's certificate and the destination
// pod's identity expected (and asked for by SNI). It decides nothing: the
// outbound decision hands it a complete target.
//
// Tunnels are streams of pooled version 3 connections (package
// tunnel/mux): one TLS connection per (source identity, destination node,
// destination identity) carries up to MaxStreamsPerConn pod connections,
// more connections are opened for a key when its connections are
// saturated, and idle ones are closed after IdleTimeout. A peer that does
// not select ALPN "tunmesh/3" speaks version 2; the dialer then uses that
// handshake as a one-stream tunnel and keeps dialing that peer per stream
// (re-probing every v2Recheck) until it is upgraded.
package dialer

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack/rawio"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
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

// Defaults of the pool.
const (
	DefaultMaxStreamsPerConn = 100
	DefaultMaxConnsPerKey    = 8
	DefaultIdleTimeout       = time.Minute
	DefaultMaxConnAge        = time.Hour
	// v2Recheck is how long a peer that answered without ALPN is dialed
	// as version 2 before the dialer offers version 3 to it again (by
	// then it may have been upgraded).
	v2Recheck = 30 * time.Second
)

// Dialer opens tunnels. Fill the exported fields before the first Dial;
// the pool itself needs no set-up. Run reaps idle connections.
type Dialer struct {
	Certs            ClientConfigs
	MeshPort         int
	ControlNamespace string
	// Timeout bounds dial, handshake and sending the header (default 10s).
	Timeout time.Duration
	// ReplyTimeout bounds the wait for the server's reply (default 20s):
	// the server may wait for its cluster view to learn the source pod
	// (inbound.Config.SourceWait, 8s) and then dial the destination pod
	// (10s), so the client must outwait both. Version 3 streams do not
	// wait for the reply before data: a stream without a reply within
	// this timeout is cut (mux.Config.ReplyTimeout), the pod reset.
	ReplyTimeout time.Duration
	// LocalAddr, when valid, is the source address of tunnels: the node
	// address the peer agent checks its source pods against.
	LocalAddr netip.Addr
	// DialTCP, if set, opens the TCP connection to a node's mesh port
	// instead of a dial from LocalAddr: the WireGuard transport dials
	// peers that publish a key through the overlay (and fails rather than
	// fall back to the underlay).
	DialTCP func(ctx context.Context, node netip.Addr, port int) (net.Conn, error)
	// RouteOf, if set, names the path DialTCP takes to a node now (the
	// WireGuard transport: underlay, or overlay to an address). A pooled
	// connection made on another path than the node's current one is
	// drained (no new streams; its streams go on): a node that switches
	// to WireGuard is not reached on the underlay for MaxConnAge more.
	RouteOf func(node netip.Addr) string
	// MaxStreamsPerConn is how many streams a pooled connection carries
	// before another connection is opened for its key (default 100);
	// MaxConnsPerKey caps the connections of one key (default 8), past
	// which streams go to the least loaded one anyway. IdleTimeout closes
	// connections without streams (default 1 minute). A key opens more
	// connections than MaxConnsPerKey only when all of its connections are
	// at the server's per-connection cap (PeerMaxStreamsPerConn).
	MaxStreamsPerConn, MaxConnsPerKey int
	IdleTimeout                       time.Duration
	// PeerMaxStreamsPerConn is the peers' cap on one connection's streams
	// (their inbound.Config.MaxStreamsPerConn; default
	// mux.DefaultMaxStreams): past it a server refuses streams busy.
	PeerMaxStreamsPerConn int
	// MaxConnAge drains a pooled connection (no new streams; closed once
	// its streams have ended) that has been up that long (default 1
	// hour). A connection is also drained once the certificate it was
	// made with has been renewed (checked every few seconds at a Dial),
	// so that no connection runs on toward its certificate's expiry,
	// where the server cuts it.
	MaxConnAge time.Duration
	// DisableV3, set before the first Dial, makes this dialer speak
	// version 2 only (no ALPN offered): for tests of mixed versions and
	// as an escape hatch.
	DisableV3 bool
	// Go, if set, starts the sessions' per-stream goroutines
	// (mux.Config.Go: a worker pool). nil: goroutines of their own.
	Go func(func())
	// Metrics, if set, counts handshakes, pooled connections and stream
	// set-up latency.
	Metrics *nodemetrics.Metrics
	// Log, if set, logs pooled connections opening and ending.
	Log *slog.Logger

	mu     sync.Mutex // guards the fields below
	pools  map[poolKey]*keyPool
	v2     map[netip.Addr]time.Time // peers that answered as version 2, until
	closed bool
}

// ErrClosed is returned by Dial after Close.
var ErrClosed = errors.New("dialer: closed")

type poolKey struct {
	src, dst spiffe.ID
	node     netip.Addr
}

// keyPool is the connections of one key.
type keyPool struct {
	sessions    []*mux.Session
	born        map[*mux.Session]pooledConn
	dialing     chan struct{} // closed when the dial in progress ends; nil if none
	leafChecked time.Time     // when the key's current certificate was last compared
}

// pooledConn is what the pool knows of one of its connections.
type pooledConn struct {
	created time.Time
	leaf    []byte // the client certificate it was made with (DER); nil: unknown
	route   string // RouteOf its node when it was added
}

// leafCheckEvery is how often a Dial compares the pooled connections'
// client certificate with the current one (see MaxConnAge).
const leafCheckEvery = 5 * time.Second

// Dial opens the tunnel for t and returns it ready for data: a stream of
// a pooled version 3 connection (whose first Read reports a refusal), or
// a version 2 tunnel after its reply, framed. Either way a cut is told
// from a clean end, and a refusal is a *tunnel.RefusedError (wrapped).
func (d *Dialer) Dial(ctx context.Context, t Target) (net.Conn, error) {
	if d.Certs == nil || d.MeshPort == 0 {
		return nil, errors.New("dialer: not configured")
	}
	hdr, err := tunnel.Header{Dst: t.Dst, Src: t.Src.Addr()}.MarshalBinary()
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, d.timeout())
	defer cancel()
	if d.DisableV3 || d.isV2(t.DstNode) {
		tc, leaf, err := d.handshake(dctx, t, !d.DisableV3)
		if err != nil {
			return nil, err
		}
		if tc.ConnectionState().NegotiatedProtocol == mux.ALPN {
			// Upgraded since: pool it.
			s, err := d.addSession(t, tc, leaf)
			if err != nil {
				return nil, err
			}
			return openStream(s, hdr)
		}
		return d.v2Tunnel(tc, t)
	}
	key := poolKey{src: t.SrcID, dst: t.DstID, node: t.DstNode}
	d.checkRenewal(key)
	for attempt := 0; ; attempt++ {
		s, wait, dialHere := d.pick(key)
		switch {
		case s == nil && wait == nil && !dialHere:
			return nil, ErrClosed
		case s != nil:
			st, err := s.OpenStream(hdr, true)
			if err == nil {
				return st, nil
			}
			if attempt >= 3 {
				return nil, err
			}
			continue // the session died meanwhile: pick again
		case wait != nil:
			select {
			case <-wait:
				continue
			case <-dctx.Done():
				return nil, fmt.Errorf("wait for a tunnel connection to %s: %w", t.DstNode, dctx.Err())
			}
		case dialHere:
		}
		tc, leaf, err := d.handshake(dctx, t, true)
		if err != nil {
			d.dialDone(key, nil, nil)
			return nil, err
		}
		if tc.ConnectionState().NegotiatedProtocol != mux.ALPN {
			d.markV2(t.DstNode)
			d.dialDone(key, nil, nil)
			return d.v2Tunnel(tc, t)
		}
		s = d.newSession(tc, t)
		if !d.dialDone(key, s, leaf) {
			s.Close()
			return nil, ErrClosed
		}
		return openStream(s, hdr)
	}
}

// openStream opens a stream on a session holding a reservation for it,
// returning a nil interface (not a nil *mux.Stream) on error.
func openStream(s *mux.Session, hdr []byte) (net.Conn, error) {
	st, err := s.OpenStream(hdr, true)
	if err != nil {
		return nil, err
	}
	return st, nil
}

func (d *Dialer) replyTimeout() time.Duration {
	if d.ReplyTimeout == 0 {
		return 20 * time.Second
	}
	return d.ReplyTimeout
}

func (d *Dialer) timeout() time.Duration {
	if d.Timeout == 0 {
		return 10 * time.Second
	}
	return d.Timeout
}

func (d *Dialer) isV2(node netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	until, ok := d.v2[node]
	return ok && time.Now().Before(until)
}

func (d *Dialer) markV2(node netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.v2 == nil {
		d.v2 = map[netip.Addr]time.Time{}
	}
	d.v2[node] = time.Now().Add(v2Recheck)
	if d.Log != nil {
		d.Log.Info("mesh peer speaks tunnel version 2: one connection per stream", "peer", node.String())
	}
}

// pick chooses a connection for key with a stream reserved on it; or the
// dial in progress to wait for; or tells the caller to dial (dialHere,
// the key's dial is then marked in progress until dialDone).
func (d *Dialer) pick(key poolKey) (s *mux.Session, wait <-chan struct{}, dialHere bool) {
	maxStreams, maxConns := d.MaxStreamsPerConn, d.MaxConnsPerKey
	if maxStreams <= 0 {
		maxStreams = DefaultMaxStreamsPerConn
	}
	if maxConns <= 0 {
		maxConns = DefaultMaxConnsPerKey
	}
	route := d.routeOf(key.node) // outside d.mu: the transport has its own lock
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, nil, false
	}
	kp := d.keyPoolLocked(key)
	var best, any *mux.Session
	bestLoad, anyLoad, open := 0, 0, 0
	live := kp.sessions[:0]
	peerMax := d.PeerMaxStreamsPerConn
	if peerMax <= 0 {
		peerMax = mux.DefaultMaxStreams
	}
	maxAge := d.MaxConnAge
	if maxAge <= 0 {
		maxAge = DefaultMaxConnAge
	}
	for _, cand := range kp.sessions {
		if pc := kp.born[cand]; time.Since(pc.created) > maxAge || pc.route != route {
			cand.Drain()
		}
		n, inFlight, closed := cand.Load()
		if closed {
			if cand.Err() == nil {
				live = append(live, cand) // draining: reap closes it once idle
			} else {
				delete(kp.born, cand)
			}
			continue
		}
		live = append(live, cand)
		open++
		if any == nil || n < anyLoad {
			any, anyLoad = cand, n
		}
		// Saturated: at its stream target, or most of its connection
		// window in flight (a bulk transfer fills it).
		if n >= maxStreams || inFlight > mux.ConnWindow*3/4 {
			continue
		}
		if best == nil || n < bestLoad {
			best, bestLoad = cand, n
		}
	}
	clear(kp.sessions[len(live):])
	kp.sessions = live
	switch {
	case best != nil && best.Reserve():
		return best, nil, false
	case kp.dialing != nil:
		return nil, kp.dialing, false
	case open >= maxConns && any != nil && anyLoad < peerMax && any.Reserve():
		// Past MaxConnsPerKey streams go to the least loaded connection,
		// up to what a server takes per connection; then a new one opens.
		return any, nil, false
	}
	kp.dialing = make(chan struct{})
	return nil, nil, true
}

func (d *Dialer) keyPoolLocked(key poolKey) *keyPool {
	if d.pools == nil {
		d.pools = map[poolKey]*keyPool{}
	}
	kp := d.pools[key]
	if kp == nil {
		kp = &keyPool{}
		d.pools[key] = kp
	}
	return kp
}

// checkRenewal drains key's connections made with a client certificate
// that has since been renewed; at most every leafCheckEvery, and the
// certificate is looked up outside the lock (it may wait for an issuance).
func (d *Dialer) checkRenewal(key poolKey) {
	d.mu.Lock()
	kp := d.keyPoolLocked(key)
	due := len(kp.sessions) > 0 && time.Since(kp.leafChecked) >= leafCheckEvery
	if due {
		kp.leafChecked = time.Now()
	}
	d.mu.Unlock()
	if !due {
		return
	}
	leaf := d.currentLeaf(key)
	if leaf == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for s, pc := range d.keyPoolLocked(key).born {
		if pc.leaf != nil && !bytes.Equal(pc.leaf, leaf) {
			s.Drain()
		}
	}
}

// currentLeaf is the client certificate a connection for key would be
// made with now (DER; nil if it cannot tell).
func (d *Dialer) currentLeaf(key poolKey) []byte {
	cfg := d.Certs.ClientConfig(key.src, key.dst)
	if cfg.GetClientCertificate != nil {
		c, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		if err != nil || c == nil || len(c.Certificate) == 0 {
			return nil
		}
		return c.Certificate[0]
	}
	if len(cfg.Certificates) > 0 && len(cfg.Certificates[0].Certificate) > 0 {
		return cfg.Certificates[0].Certificate[0]
	}
	return nil
}

// dialDone ends the key's dial in progress, adding s (with a stream
// reserved on it, made with client certificate leaf) to the pool; false
// if the dialer was closed meanwhile.
func (d *Dialer) dialDone(key poolKey, s *mux.Session, leaf []byte) bool {
	route := d.routeOf(key.node)
	d.mu.Lock()
	defer d.mu.Unlock()
	kp := d.keyPoolLocked(key)
	if kp.dialing != nil {
		close(kp.dialing)
		kp.dialing = nil
	}
	if d.closed {
		return false
	}
	if s != nil {
		kp.addLocked(s, leaf, route)
	}
	return true
}

// routeOf is RouteOf(node), or "" without the hook.
func (d *Dialer) routeOf(node netip.Addr) string {
	if d.RouteOf == nil {
		return ""
	}
	return d.RouteOf(node)
}

func (kp *keyPool) addLocked(s *mux.Session, leaf []byte, route string) {
	kp.sessions = append(kp.sessions, s)
	if kp.born == nil {
		kp.born = map[*mux.Session]pooledConn{}
	}
	kp.born[s] = pooledConn{created: time.Now(), leaf: leaf, route: route}
}

// newSession starts a client session on tc with one stream reserved.
func (d *Dialer) newSession(tc *tls.Conn, t Target) *mux.Session {
	cfg := mux.Config{ReplyTimeout: d.replyTimeout(), Go: d.Go}
	if m := d.Metrics; m != nil {
		cfg.OnReply = func(st *mux.Stream, err error) {
			m.Handshake.Observe(time.Since(st.Opened()).Seconds())
		}
		m.PoolConns.WithLabelValues("outbound").Inc()
	}
	cfg.OnClose = func(err error) {
		protocol := errors.Is(err, mux.ErrProtocol)
		if d.Metrics != nil {
			d.Metrics.PoolConns.WithLabelValues("outbound").Dec()
			if protocol {
				d.Metrics.Errors.WithLabelValues("protocol").Inc()
			}
		}
		if d.Log != nil {
			level := slog.LevelDebug
			if protocol {
				level = slog.LevelWarn // a peer agent that breaks the framing
			}
			d.Log.Log(context.Background(), level, "tunnel connection ended", "peer", t.DstNode.String(), "client_id", t.SrcID.String(), "server_id", t.DstID.String(), "err", err)
		}
	}
	s := mux.Client(tc, cfg)
	s.Reserve()
	return s
}

// addSession adds a session for a connection that was dialed outside the
// pool (a peer thought to speak version 2 answered version 3).
func (d *Dialer) addSession(t Target, tc *tls.Conn, leaf []byte) (*mux.Session, error) {
	s := d.newSession(tc, t)
	key := poolKey{src: t.SrcID, dst: t.DstID, node: t.DstNode}
	route := d.routeOf(t.DstNode)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		s.Close()
		return nil, ErrClosed
	}
	delete(d.v2, t.DstNode)
	d.keyPoolLocked(key).addLocked(s, leaf, route)
	return s, nil
}

// handshake dials the peer agent and completes mTLS, offering version 3
// by ALPN when v3. leaf is the client certificate it presented (DER).
func (d *Dialer) handshake(ctx context.Context, t Target, v3 bool) (tc *tls.Conn, leaf []byte, err error) {
	var raw net.Conn
	if d.DialTCP != nil {
		raw, err = d.DialTCP(ctx, t.DstNode, d.MeshPort)
	} else {
		var nd net.Dialer
		if d.LocalAddr.IsValid() {
			nd.LocalAddr = &net.TCPAddr{IP: d.LocalAddr.AsSlice()}
		}
		raw, err = nd.DialContext(ctx, "tcp", net.JoinHostPort(t.DstNode.String(), strconv.Itoa(d.MeshPort)))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("dial mesh peer %s: %w", t.DstNode, err)
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		// A pooled connection must notice a peer that vanished.
		if err := tunnel.DetectDeadPeer(tcp); err != nil {
			raw.Close()
			return nil, nil, err
		}
		// Raw reads and writes: an idle agent's first message does not
		// wake the runtime's sysmon (see package rawio).
		raw = rawio.Wrap(tcp)
	}
	cfg := d.Certs.ClientConfig(t.SrcID, t.DstID)
	cfg.ServerName = t.DstID.DNSName(d.ControlNamespace)
	if v3 {
		cfg.NextProtos = []string{mux.ALPN}
	}
	// crypto/tls starts a connection with ~1 KiB records, growing until
	// 128 KiB are sent; a pooled connection carrying bulk data gains
	// nothing from that: full 16 KiB records from the first byte.
	cfg.DynamicRecordSizingDisabled = true
	// Remember the certificate presented, to drain the connection once
	// it is renewed (see MaxConnAge).
	if get := cfg.GetClientCertificate; get != nil {
		cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(cri)
			if err == nil && c != nil && len(c.Certificate) > 0 {
				leaf = c.Certificate[0]
			}
			return c, err
		}
	} else if len(cfg.Certificates) > 0 && len(cfg.Certificates[0].Certificate) > 0 {
		leaf = cfg.Certificates[0].Certificate[0]
	}
	tc = tls.Client(raw, cfg)
	start := time.Now()
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		if d.Metrics != nil {
			d.Metrics.Errors.WithLabelValues("handshake_client").Inc()
		}
		return nil, nil, fmt.Errorf("handshake with %s: %w", t.DstNode, err)
	}
	if d.Metrics != nil {
		proto := "v2"
		if tc.ConnectionState().NegotiatedProtocol == mux.ALPN {
			proto = "v3"
		}
		d.Metrics.Handshakes.WithLabelValues("outbound", proto).Inc()
		d.Metrics.HandshakeSeconds.Observe(time.Since(start).Seconds())
	}
	return tc, leaf, nil
}

// v2Tunnel runs the version 2 exchange on a fresh connection: header,
// then the server's reply, before any data.
func (d *Dialer) v2Tunnel(tc *tls.Conn, t Target) (net.Conn, error) {
	start := time.Now()
	_ = tc.SetDeadline(time.Now().Add(d.timeout()))
	if err := tunnel.WriteHeader(tc, tunnel.Header{Dst: t.Dst, Src: t.Src.Addr()}); err != nil {
		tc.NetConn().Close()
		return nil, err
	}
	_ = tc.SetReadDeadline(time.Now().Add(d.replyTimeout()))
	if err := tunnel.ReadReply(tc); err != nil {
		tc.NetConn().Close()
		return nil, err
	}
	_ = tc.SetDeadline(time.Time{})
	if d.Metrics != nil {
		d.Metrics.Handshake.Observe(time.Since(start).Seconds())
	}
	return tunnel.NewFramedConn(tc), nil
}

// Run closes pooled connections that have been idle for IdleTimeout until
// ctx ends, then closes every pooled connection (their streams are cut).
func (d *Dialer) Run(ctx context.Context) error {
	idle := d.IdleTimeout
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	tick := time.NewTicker(max(idle/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			d.Close()
			return nil
		case <-tick.C:
			d.reap(idle)
		}
	}
}

// reap closes and forgets idle or ended connections.
func (d *Dialer) reap(idle time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for key, kp := range d.pools {
		live := kp.sessions[:0]
		for _, s := range kp.sessions {
			if !s.CloseIfIdle(idle) {
				live = append(live, s)
			} else {
				delete(kp.born, s)
			}
		}
		clear(kp.sessions[len(live):])
		kp.sessions = live
		if len(live) == 0 && kp.dialing == nil {
			delete(d.pools, key)
		}
	}
	for node, until := range d.v2 {
		if time.Now().After(until) {
			delete(d.v2, node)
		}
	}
}

// Conns reports the pooled connections open, for tests and the admin API.
func (d *Dialer) Conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, kp := range d.pools {
		for _, s := range kp.sessions {
			if _, _, closed := s.Load(); !closed {
				n++
			}
		}
	}
	return n
}

// Close closes every pooled connection; their streams are cut.
func (d *Dialer) Close() {
	d.mu.Lock()
	var all []*mux.Session
	for _, kp := range d.pools {
		all = append(all, kp.sessions...)
	}
	d.pools = nil
	d.closed = true
	d.mu.Unlock()
	for _, s := range all {
		s.Close()
	}
	for _, s := range all {
		s.Wait()
	}
}
