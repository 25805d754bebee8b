// Package observe is the agent's observability API: capture, tap and
// edges, served over TLS on their own port (default <node-ip>:4192), never
// on the unauthenticated admin port. Every call is authenticated and
// authorized by node/access (TokenReview or a client certificate, then a
// SubjectAccessReview on pods/capture|tap|edges in tap.tunmesh.io), and
// every capture and tap is logged with who, which pod and how long.
//
//	GET /v1/capture?namespace=NS&pod=NAME&side=pod|wire|both&port=P&duration=D&count=N&maxBytes=B
//	    200 application/vnd.tcpdump.pcapng, streamed until the capture ends
//	GET /v1/tap?namespace=NS[&pod=NAME]
//	    200 application/x-ndjson: flowlog.Event per line, until the caller goes away
//	GET /v1/edges[?namespace=NS]
//	    200 application/json: []flowlog.Edge of this node's pods
//	GET /v1/pods[?namespace=NS]   (authorized as edges)
//	    200 application/json: []PodCert, the node's meshed pods and their
//	    certificates (for tunmeshctl check --proxy)
package observe

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/access"
	"github.com/tunmesh/tunmesh/node/capture"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/node/pods"
)

// Paths and port of the API (observeapi holds them for tunmeshctl).
const (
	CapturePath = observeapi.CapturePath
	TapPath     = observeapi.TapPath
	EdgesPath   = observeapi.EdgesPath
	PodsPath    = observeapi.PodsPath
	DefaultPort = observeapi.DefaultPort
)

// PodCert is a meshed pod and its certificate (GET /v1/pods).
type PodCert = observeapi.PodCert

// Auth authenticates and authorizes callers (access.Gate).
type Auth interface {
	Authenticate(r *http.Request) (access.User, error)
	Authorize(ctx context.Context, u access.User, a access.Attributes) error
}

// Pods lists the node's meshed pods (pods.Registry).
type Pods interface {
	All() []*pods.Pod
}

// Config is what the API serves from.
type Config struct {
	Auth Auth
	Pods Pods
	Log  *flowlog.Log
	// TapNIC taps a pod's tm0 in the netstack (netstack.Stack.TapNIC).
	TapNIC func(netstack.NICID, netstack.PacketTap) (func(), error)
	// Sources overrides how eth0 and the wire are read (tests); nil uses
	// packet sockets.
	Sources func(p *pods.Pod, side capture.Side, keepWire func([]byte) bool) []capture.Source
	// MeshPort is the tunnel port the wire side shows (default 4143).
	MeshPort uint16
	// Certificate returns an identity's current certificate without
	// waiting (workload.Manager.Certificate with a short context); nil:
	// /v1/pods reports no certificates.
	Certificate func(spiffe.ID) (*tls.Certificate, error)
	// TapBuffer is how many events a slow tap reader may lag (default
	// DefaultTapBuffer) before events are dropped (and the stream says how many).
	TapBuffer int
	// TapWriteTimeout bounds each write of a tap stream (default
	// TapWriteTimeout): a reader that stops reading ends its tap.
	TapWriteTimeout time.Duration
	// Limits cap the concurrent streams (zero fields: DefaultLimits).
	Limits Limits
	// RatePerSecond and RateBurst bound each remote address's requests
	// (defaults DefaultRatePerSecond, DefaultRateBurst); past them: 429.
	RatePerSecond float64
	RateBurst     int
	// Registerer, if set, gets the streams' series.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// TapWriteTimeout is how long one write of a tap stream may block.
const TapWriteTimeout = 10 * time.Second

// Handler returns the API's handler.
func Handler(cfg Config) (http.Handler, error) {
	if cfg.Auth == nil || cfg.Pods == nil || cfg.Log == nil || cfg.TapNIC == nil || cfg.Logger == nil {
		return nil, errors.New("observe: nil dependency")
	}
	if cfg.MeshPort == 0 {
		cfg.MeshPort = 4143
	}
	if cfg.TapWriteTimeout == 0 {
		cfg.TapWriteTimeout = TapWriteTimeout
	}
	if cfg.TapBuffer == 0 {
		cfg.TapBuffer = DefaultTapBuffer
	}
	lim, err := newLimiter(cfg.Limits, cfg.Registerer)
	if err != nil {
		return nil, err
	}
	s := &server{cfg: cfg, lim: lim}
	if s.cfg.Sources == nil {
		s.cfg.Sources = s.packetSockets
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+CapturePath, s.capture)
	mux.HandleFunc("GET "+TapPath, s.tap)
	mux.HandleFunc("GET "+EdgesPath, s.edges)
	mux.HandleFunc("GET "+PodsPath, s.pods)
	return newAddrLimiter(cfg.RatePerSecond, cfg.RateBurst).wrap(mux), nil
}

type server struct {
	cfg Config
	lim *limiter
}

// DefaultTapBuffer is how many events a tap reader may lag: small, since
// every open tap holds it (an Event is about 460 bytes).
const DefaultTapBuffer = 128

// stream takes a stream slot for u, or answers 503 and returns nil.
func (s *server) stream(w http.ResponseWriter, r *http.Request, u access.User, kind string, a access.Attributes) func() {
	release, err := s.lim.acquire(u.Name, kind)
	if err != nil {
		s.cfg.Logger.Warn("observability call refused", "user", u.Name, "what", a.String(), "remote", r.RemoteAddr, "err", err)
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return nil
	}
	return release
}

// allow authenticates r and authorizes a; on refusal it answers and
// returns false.
func (s *server) allow(w http.ResponseWriter, r *http.Request, a access.Attributes) (access.User, bool) {
	u, err := s.cfg.Auth.Authenticate(r)
	if err == nil {
		err = s.cfg.Auth.Authorize(r.Context(), u, a)
	}
	if err != nil {
		s.cfg.Logger.Warn("observability call refused", "user", u.Name, "what", a.String(), "remote", r.RemoteAddr, "err", err)
		http.Error(w, err.Error(), access.Status(err))
		return u, false
	}
	return u, true
}

func (s *server) pod(ns, name string) *pods.Pod {
	for _, p := range s.cfg.Pods.All() {
		if p.Namespace == ns && p.Name == name {
			return p
		}
	}
	return nil
}

func (s *server) capture(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, name := q.Get("namespace"), q.Get("pod")
	if ns == "" || name == "" {
		http.Error(w, "namespace and pod are required", http.StatusBadRequest)
		return
	}
	req, err := captureRequest(q)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	attrs := access.Attributes{Subresource: access.Capture, Namespace: ns, Name: name}
	u, ok := s.allow(w, r, attrs)
	if !ok {
		return
	}
	p := s.pod(ns, name)
	if p == nil {
		http.Error(w, fmt.Sprintf("pod %s/%s is not meshed on this node", ns, name), http.StatusNotFound)
		return
	}
	release := s.stream(w, r, u, "capture", attrs)
	if release == nil {
		return
	}
	defer release()
	peers := &peerSet{log: s.cfg.Log, pod: p, local: localAddrs()}
	peers.update()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if req.Side != capture.SidePod {
		go func() { // RoutinePeers: ends with the capture
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					peers.update()
				}
			}
		}()
	}
	srcs := s.cfg.Sources(p, req.Side, peers.keep)
	log := s.cfg.Logger.With("user", u.Name, "auth", u.Method, "pod", name, "pod_namespace", ns, "side", string(req.Side), "remote", r.RemoteAddr)
	log.Info("capture started", "port", req.Port, "max_duration", req.Duration, "max_packets", req.MaxPackets, "max_bytes", req.MaxBytes)
	w.Header().Set("Content-Type", "application/vnd.tcpdump.pcapng")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", name+".pcapng"))
	rc := http.NewResponseController(w)
	req.WriteDeadline = rc.SetWriteDeadline
	start := time.Now()
	st, err := capture.Run(ctx, w, func() { _ = rc.Flush() }, req, srcs)
	if err != nil {
		log.Warn("capture failed", "err", err, "duration", time.Since(start))
		if st.Packets == 0 {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
		return
	}
	log.Info("capture ended", "duration", time.Since(start).Round(time.Millisecond), "packets", st.Packets, "bytes", st.Bytes, "dropped", st.Dropped, "reason", st.Reason)
}

func captureRequest(q map[string][]string) (capture.Request, error) {
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	var req capture.Request
	var err error
	if req.Side, err = capture.ParseSide(get("side")); err != nil {
		return req, err
	}
	if v := get("port"); v != "" {
		p, err := strconv.ParseUint(v, 10, 16)
		if err != nil {
			return req, fmt.Errorf("port %q: %w", v, err)
		}
		req.Port = uint16(p)
	}
	if v := get("duration"); v != "" {
		if req.Duration, err = time.ParseDuration(v); err != nil {
			return req, fmt.Errorf("duration %q: %w", v, err)
		}
	}
	if v := get("count"); v != "" {
		if req.MaxPackets, err = strconv.Atoi(v); err != nil {
			return req, fmt.Errorf("count %q: %w", v, err)
		}
	}
	if v := get("maxBytes"); v != "" {
		if req.MaxBytes, err = strconv.ParseInt(v, 10, 64); err != nil {
			return req, fmt.Errorf("maxBytes %q: %w", v, err)
		}
	}
	return req, req.Normalize()
}

// packetSockets are the real sources: tm0 through the netstack's tap,
// eth0 inside the pod's namespace, the mesh port in the node's.
func (s *server) packetSockets(p *pods.Pod, side capture.Side, keepWire func([]byte) bool) []capture.Source {
	var srcs []capture.Source
	if side != capture.SideWire {
		nic := p.NIC
		srcs = append(srcs, capture.Source{Name: "tm0", LinkType: layers.LinkTypeRaw, Start: func(emit func([]byte, bool)) (func(), error) {
			return s.cfg.TapNIC(nic, func(out bool, b []byte) { emit(b, out) })
		}})
		srcs = append(srcs, capture.PacketSocket("eth0", p.Netns, "eth0", 0, false))
	}
	if side != capture.SidePod {
		wire := capture.PacketSocket("node:mesh-port-"+strconv.Itoa(int(s.cfg.MeshPort)), "", "", s.cfg.MeshPort, true)
		wire.Keep = keepWire
		srcs = append(srcs, wire)
	}
	return srcs
}

// peerSet is the set of nodes a pod's meshed connections go through,
// read by the wire source's reader (atomic), refreshed every second and,
// at most every 100ms, when a packet matches no known peer (a connection
// to a new node just opened). A wire packet is kept when one end is such a
// peer and the other an address of this node (local): a tunnel between
// this node and a node the pod talks to. With a same-node pair this
// node's own address is a peer too, and still only packets between this
// node and a peer match, not every tunnel of the node. When the
// accounting knows the tunnel connection of a pod's meshed connection
// (flowlog.Conn.Tunnel), only that 4-tuple is kept for it.
type peerSet struct {
	set      atomic.Pointer[map[netip.Addr]bool]
	tunnels  atomic.Pointer[map[[2]netip.AddrPort]bool] // both orders
	local    map[netip.Addr]bool                        // this node's addresses, read once
	log      *flowlog.Log
	pod      *pods.Pod
	lastMiss atomic.Int64 // unix nanos of the last refresh on a miss
}

// localAddrs are the addresses of the agent's (the node's) interfaces.
func localAddrs() map[netip.Addr]bool {
	m := map[netip.Addr]bool{}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return m
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			m[p.Addr().Unmap()] = true
		}
	}
	return m
}

// update reads the pod's meshed connections: the 4-tuples of the tunnel
// connections that carry them, and the peer nodes of those whose tunnel
// is not known.
func (ps *peerSet) update() {
	m := map[netip.Addr]bool{}
	tun := map[[2]netip.AddrPort]bool{}
	for _, c := range ps.log.Conns() {
		if c.TLS != flowlog.TLSTrue || !c.Peer.IsValid() {
			continue
		}
		local := c.SrcPod
		if c.Proxy == flowlog.In {
			local = c.DstPod
		}
		if local.Namespace != ps.pod.Namespace || local.Name != ps.pod.Name {
			continue
		}
		if c.Tunnel[0].IsValid() && c.Tunnel[1].IsValid() {
			tun[c.Tunnel] = true
			tun[[2]netip.AddrPort{c.Tunnel[1], c.Tunnel[0]}] = true
		} else {
			m[c.Peer] = true
		}
	}
	ps.tunnels.Store(&tun)
	ps.set.Store(&m)
}

// match: a tunnel connection of the pod's, or (tunnel unknown) one end a
// peer node and the other this node.
func (ps *peerSet) match(src, dst netip.AddrPort) bool {
	if t := ps.tunnels.Load(); t != nil && (*t)[[2]netip.AddrPort{src, dst}] {
		return true
	}
	m := ps.set.Load()
	if m == nil {
		return false
	}
	sa, da := src.Addr(), dst.Addr()
	return (*m)[sa] && ps.local[da] || (*m)[da] && ps.local[sa]
}

// keep: a wire packet between this node and one of the pod's peers.
func (ps *peerSet) keep(pkt []byte) bool {
	_, src, dst, ok := capture.Ports(pkt, layers.LinkTypeEthernet)
	if !ok {
		return false
	}
	src, dst = netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if ps.match(src, dst) {
		return true
	}
	now := time.Now().UnixNano()
	if last := ps.lastMiss.Load(); now-last < int64(100*time.Millisecond) || !ps.lastMiss.CompareAndSwap(last, now) {
		return false
	}
	ps.update()
	return ps.match(src, dst)
}

func (s *server) tap(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, name := q.Get("namespace"), q.Get("pod")
	if ns == "" && name != "" {
		http.Error(w, "pod needs a namespace", http.StatusBadRequest)
		return
	}
	attrs := access.Attributes{Subresource: access.Tap, Namespace: ns, Name: name}
	u, ok := s.allow(w, r, attrs)
	if !ok {
		return
	}
	release := s.stream(w, r, u, "tap", attrs)
	if release == nil {
		return
	}
	defer release()
	sub := s.cfg.Log.Subscribe(flowlog.Filter{Namespace: ns, Name: name}, s.cfg.TapBuffer)
	defer sub.Close()
	log := s.cfg.Logger.With("user", u.Name, "auth", u.Method, "pod", name, "pod_namespace", ns, "remote", r.RemoteAddr)
	log.Info("tap started")
	start := time.Now()
	w.Header().Set("Content-Type", "application/x-ndjson")
	rc := http.NewResponseController(w)
	// Every write (a batch, a keepalive) must finish within
	// TapWriteTimeout: a stalled reader ends its tap.
	deadline := func() { _ = rc.SetWriteDeadline(time.Now().Add(s.cfg.TapWriteTimeout)) }
	enc := json.NewEncoder(w)
	deadline()
	if err := rc.Flush(); err != nil {
		return
	}
	var events, reported uint64
	defer func() {
		log.Info("tap ended", "duration", time.Since(start).Round(time.Millisecond), "events", events, "dropped", sub.Dropped())
	}()
	keepalive := time.NewTicker(15 * time.Second)
	defer keepalive.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-keepalive.C:
			// A write notices a caller that went away.
			deadline()
			if _, err := w.Write([]byte("\n")); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		case e := <-sub.C():
			deadline()
			if d := sub.Dropped(); d != reported {
				if err := enc.Encode(flowlog.Event{Type: "dropped", Time: time.Now(), ResponseLength: int64(d - reported)}); err != nil {
					return
				}
				reported = d
			}
			if err := enc.Encode(e); err != nil {
				return
			}
			events++
			for more := true; more; {
				select {
				case e := <-sub.C():
					if err := enc.Encode(e); err != nil {
						return
					}
					events++
				default:
					more = false
				}
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

func (s *server) edges(w http.ResponseWriter, r *http.Request) {
	ns := r.URL.Query().Get("namespace")
	if _, ok := s.allow(w, r, access.Attributes{Subresource: access.Edges, Namespace: ns}); !ok {
		return
	}
	out := []flowlog.Edge{}
	for _, e := range s.cfg.Log.Edges() {
		if ns == "" || e.Src.Namespace == ns || e.Dst.Namespace == ns {
			out = append(out, e)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func (s *server) pods(w http.ResponseWriter, r *http.Request) {
	ns := r.URL.Query().Get("namespace")
	if _, ok := s.allow(w, r, access.Attributes{Subresource: access.Edges, Namespace: ns}); !ok {
		return
	}
	out := []PodCert{}
	for _, p := range s.cfg.Pods.All() {
		if ns != "" && p.Namespace != ns {
			continue
		}
		pc := PodCert{Namespace: p.Namespace, Name: p.Name, Identity: p.ID.String()}
		switch {
		case s.cfg.Certificate == nil:
			pc.Error = "certificates not reported"
		default:
			c, err := s.cfg.Certificate(p.ID)
			if err != nil {
				pc.Error = err.Error()
				break
			}
			var b strings.Builder
			for _, der := range c.Certificate {
				_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: der})
			}
			pc.Chain = b.String()
		}
		out = append(out, pc)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name })
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}
