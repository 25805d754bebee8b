package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/resolve"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// Dialer opens tunnels (dialer.Dialer): a pooled stream, or a version 2
// tunnel. A refusal arrives from Dial (version 2) or as the tunnel's first
// Read (a stream: no round trip before data).
type Dialer interface {
	Dial(ctx context.Context, t dialer.Target) (net.Conn, error)
}

// Tracker counts active streams per endpoint (resolve.Resolver).
type Tracker interface {
	Track(ep resolve.Endpoint) (done func())
}

// Certs tells whether a local identity's certificate is available, waiting
// up to ctx for the first one (workload.Manager).
type Certs interface {
	Certificate(ctx context.Context, id spiffe.ID) (*tls.Certificate, error)
}

// Options tune the handler's waits; zero values mean the defaults.
type Options struct {
	// SyncWait is how long a flow that arrives before the cluster view
	// has synced is held before it is dropped (the pod retransmits).
	// Default 2s.
	SyncWait time.Duration
	// CertWait is how long the first flow of an identity whose
	// certificate is not issued yet waits for it before it is refused.
	// Default 3s.
	CertWait time.Duration
	// MaxConnsPerPod caps one pod's concurrent meshed connections (each a
	// tunnel stream, its splice and its netstack endpoint); past it new
	// ones are refused. Default 4096.
	MaxConnsPerPod int
	// Flows is the connection accounting (edges, tap, per-workload
	// metrics); nil records nothing.
	Flows *flowlog.Log
	// Go, if set, starts the splice's on-demand copy of the pod's bytes
	// (tunnel.SpliceOptions.Go: a worker pool). nil: a goroutine of its
	// own.
	Go func(func())
}

// Handler is the netstack.FlowHandler (and SegmentDecider) for flows from
// local pods: it asks the Decider and serves the flows it meshes.
type Handler struct {
	decider *Decider
	dialer  Dialer
	tracker Tracker
	certs   Certs
	opts    Options
	metrics *nodemetrics.Metrics
	log     *slog.Logger
	pending pendingFlows
	logRate rateLimit

	activeMu sync.Mutex // guards active
	active   map[netstack.NICID]int
}

// NewHandler checks its dependencies.
func NewHandler(d *Decider, dl Dialer, tr Tracker, certs Certs, opts Options, m *nodemetrics.Metrics, log *slog.Logger) (*Handler, error) {
	if d == nil || dl == nil || tr == nil || certs == nil || m == nil || log == nil {
		return nil, errors.New("outbound handler: nil dependency")
	}
	if d.Local == nil || d.Cluster == nil || d.Services == nil || d.Synced == nil {
		return nil, errors.New("outbound handler: incomplete decider")
	}
	if opts.SyncWait == 0 {
		opts.SyncWait = 2 * time.Second
	}
	if opts.CertWait == 0 {
		opts.CertWait = 3 * time.Second
	}
	if opts.MaxConnsPerPod == 0 {
		opts.MaxConnsPerPod = 4096
	}
	return &Handler{decider: d, dialer: dl, tracker: tr, certs: certs, opts: opts, metrics: m, log: log,
		pending: pendingFlows{m: map[netstack.Flow]*pendingTarget{}}, active: map[netstack.NICID]int{}}, nil
}

// HandleFlow implements netstack.FlowHandler. It may block for a bounded
// time (SyncWait, CertWait): the pod's SYN waits meanwhile.
func (h *Handler) HandleFlow(f netstack.Flow) netstack.Decision {
	d := h.decider.Decide(f)
	if d.Verdict == Hold && d.Reason == ReasonNotSynced {
		// Right after an agent (re)start: wait for the view rather than
		// make every re-attached pod retransmit.
		ctx, cancel := context.WithTimeout(context.Background(), h.opts.SyncWait)
		for d.Verdict == Hold && d.Reason == ReasonNotSynced && ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
			d = h.decider.Decide(f)
		}
		cancel()
	}
	if d.Verdict == Mesh && h.activeConns(f.NIC) >= h.opts.MaxConnsPerPod {
		d = Decision{Verdict: Refuse, Reason: ReasonPodConnLimit}
	}
	if d.Verdict == Mesh {
		// The first flow of an identity may come before its certificate:
		// wait for it (bounded), then refuse. Never plaintext.
		ctx, cancel := context.WithTimeout(context.Background(), h.opts.CertWait)
		_, err := h.certs.Certificate(ctx, d.Target.Src.ID)
		cancel()
		if err != nil {
			d = Decision{Verdict: Refuse, Reason: ReasonNoCertificate}
			h.failClosed(f, d, err)
			return netstack.Reset
		}
		h.pending.put(f, d.Target)
		return netstack.Terminate
	}
	switch d.Verdict {
	case Pass:
		h.metrics.Passthrough.WithLabelValues(d.Reason).Inc()
		h.seen(f, d)
		h.log.Debug("connection not meshed", "src", f.Src.String(), "dst", f.Dst.String(), "tls", false, "reason", d.Reason)
		return netstack.Passthrough
	case Refuse:
		h.failClosed(f, d, nil)
		h.seen(f, d)
		return netstack.Reset
	case Deny:
		// A policy refused it: Access logged it once per connection (at
		// Info, with the policy), not as a failure of the mesh.
		h.metrics.Refused.WithLabelValues(d.Reason).Inc()
		return netstack.Drop
	default:
		h.failClosed(f, d, nil)
		return netstack.Drop
	}
}

// HandleSegment implements netstack.SegmentDecider.
func (h *Handler) HandleSegment(f netstack.Flow) netstack.Decision {
	d := h.decider.DecideSegment(f)
	if d.Verdict == Pass {
		return netstack.Passthrough
	}
	h.metrics.Refused.WithLabelValues("segment_" + d.Reason).Inc()
	if h.logRate.allow(10 * time.Second) {
		h.log.Info("segment of a claimed flow dropped (further drops only counted for 10s)", "src", f.Src.String(), "dst", f.Dst.String(), "reason", d.Reason)
	}
	return netstack.Drop
}

// failClosed counts and logs a flow the mesh claims but does not carry.
func (h *Handler) failClosed(f netstack.Flow, d Decision, err error) {
	h.metrics.Refused.WithLabelValues(d.Reason).Inc()
	if h.logRate.allow(time.Second) {
		h.log.Warn("connection failed closed", "src", f.Src.String(), "dst", f.Dst.String(), "verdict", d.Verdict.String(), "reason", d.Reason, "err", err)
	}
}

// aborter is a connection that can be reset (netstack.Conn).
type aborter interface{ Abort() }

// abort resets conn so that the pod sees an error, not a clean end.
func abort(conn net.Conn) {
	if a, ok := conn.(aborter); ok {
		a.Abort()
		return
	}
	conn.Close()
}

// ServeConn carries a terminated flow to the destination node's agent.
// Every failure resets the pod's connection. Once the tunnel is open, a
// pod connection that can be held (netstack.Conn.Hold) is spliced
// asynchronously and ServeConn returns: an idle meshed connection then
// parks no goroutine here (docs/performance.md, Memory); the accounting
// below runs when the splice ends.
func (h *Handler) ServeConn(ctx context.Context, conn net.Conn, f netstack.Flow) {
	t, ok := h.pending.take(f)
	if !ok {
		abort(conn)
		return
	}
	if !h.enter(f.NIC) {
		abort(conn)
		h.metrics.Refused.WithLabelValues(ReasonPodConnLimit).Inc()
		return
	}
	var untrack func()
	if t.Endpoint != nil {
		untrack = h.tracker.Track(*t.Endpoint)
	}
	// finish undoes the two above when the connection is over.
	finish := func() {
		if untrack != nil {
			untrack()
		}
		h.exit(f.NIC)
	}
	start := time.Now()
	tc, err := h.dialer.Dial(ctx, dialer.Target{SrcID: t.Src.ID, Src: f.Src, Dst: t.Dst, DstID: t.DstID, DstNode: t.DstNode})
	if err != nil {
		abort(conn)
		h.dialFailed(f, t, err)
		finish()
		return
	}
	h.metrics.Opened.WithLabelValues("outbound").Inc()
	h.metrics.Active.WithLabelValues("outbound").Inc()
	track, podConn := h.track(f, t, conn, tc)
	closed := func(stats tunnel.SpliceStats, err error) {
		defer finish()
		h.metrics.Active.WithLabelValues("outbound").Dec()
		h.metrics.Closed.WithLabelValues("outbound").Inc()
		end := tunnel.EndOf(err)
		var refused *tunnel.RefusedError
		if errors.As(err, &refused) {
			// A stream's refusal arrives as its first read.
			end = "refused"
			h.dialFailed(f, t, err)
		}
		h.metrics.Ends.WithLabelValues("outbound", end).Inc()
		h.metrics.Bytes.WithLabelValues("outbound", "sent").Add(float64(stats.AToB))
		h.metrics.Bytes.WithLabelValues("outbound", "received").Add(float64(stats.BToA))
		if track != nil {
			track.Close(stats.AToB, stats.BToA, end)
		}
		// Debug: tap and edges show every connection (docs/observability.md).
		h.log.Debug("connection closed", "direction", "outbound", "src_pod", t.Src.FullName(),
			"client_id", t.Src.ID.String(), "server_id", t.DstID.String(), "dst", t.Dst.String(), "tls", true,
			"bytes_sent", stats.AToB, "bytes_received", stats.BToA, "duration", time.Since(start), "end", end, "err", err)
	}
	opts := tunnel.SpliceOptions{IdleTimeout: time.Hour, Go: h.opts.Go}
	if hc, ok := conn.(holder); ok {
		if release, ok := hc.Hold(); ok {
			tunnel.SpliceAsync(ctx, podConn, tc, opts, func(stats tunnel.SpliceStats, err error) {
				defer release()
				closed(stats, err)
			})
			return
		}
	}
	closed(tunnel.Splice(ctx, podConn, tc, opts))
}

// holder is a pod connection that can outlive ServeConn (netstack.Conn).
type holder interface {
	Hold() (release func(), ok bool)
}

// seen records a flow the mesh did not carry, and why (edges' MSG).
func (h *Handler) seen(f netstack.Flow, d Decision) {
	if h.opts.Flows == nil {
		return
	}
	h.opts.Flows.Seen(flowlog.Conn{Proxy: flowlog.Out, Src: f.Src, Dst: f.Dst, TLS: d.Reason})
}

// track records a meshed connection and wraps the pod's side for the
// HTTP/1 observer when metrics or a tap want it (nil: no accounting).
// tc is the stream to the peer agent: its addresses are the carrying
// TCP connection's (capture --side wire keeps that 4-tuple).
func (h *Handler) track(f netstack.Flow, t Target, conn, tc net.Conn) (*flowlog.Track, net.Conn) {
	if h.opts.Flows == nil {
		return nil, conn
	}
	c := flowlog.Conn{Proxy: flowlog.Out, Src: f.Src, Dst: t.Dst, TLS: flowlog.TLSTrue,
		ClientID: t.Src.ID.String(), ServerID: t.DstID.String(), Peer: t.DstNode, Tunnel: flowlog.TunnelOf(tc)}
	tr := h.opts.Flows.Open(c)
	// The pod's connection reads the client's bytes.
	return tr, tr.Observe(conn, true)
}

// dialFailed counts and logs a tunnel that could not be opened, or that
// the server refused.
func (h *Handler) dialFailed(f netstack.Flow, t Target, err error) {
	var refused *tunnel.RefusedError
	if errors.As(err, &refused) {
		h.metrics.Errors.WithLabelValues("refused_" + refused.Reason.String()).Inc()
	}
	h.metrics.Errors.WithLabelValues("dial").Inc()
	h.log.Warn("mesh dial failed", "src", f.Src.String(), "dst", t.Dst.String(), "identity", t.DstID.String(), "err", err)
}

func (h *Handler) activeConns(nic netstack.NICID) int {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	return h.active[nic]
}

// enter counts one more meshed connection of the pod behind nic, unless it
// is at its cap.
func (h *Handler) enter(nic netstack.NICID) bool {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	if h.active[nic] >= h.opts.MaxConnsPerPod {
		return false
	}
	h.active[nic]++
	return true
}

func (h *Handler) exit(nic netstack.NICID) {
	h.activeMu.Lock()
	defer h.activeMu.Unlock()
	if h.active[nic]--; h.active[nic] <= 0 {
		delete(h.active, nic)
	}
}

// rateLimit lets one event per interval through; the zero value is ready.
type rateLimit struct{ last atomic.Int64 }

func (r *rateLimit) allow(interval time.Duration) bool {
	now := time.Now().UnixNano()
	last := r.last.Load()
	if last != 0 && now-last < int64(interval) {
		return false
	}
	return r.last.CompareAndSwap(last, now)
}

// pendingFlows hands decisions from HandleFlow to ServeConn. A flow whose
// handshake never completes gets no ServeConn, so entries older than
// pendingTTL are swept when the map grows past pendingSweepAt.
type pendingFlows struct {
	mu sync.Mutex // guards m
	m  map[netstack.Flow]*pendingTarget
}

type pendingTarget struct {
	t       Target
	decided time.Time
}

const (
	pendingTTL     = time.Minute
	pendingSweepAt = 1024
)

func (p *pendingFlows) put(f netstack.Flow, t Target) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.m) >= pendingSweepAt {
		for k, v := range p.m {
			if now.Sub(v.decided) > pendingTTL {
				delete(p.m, k)
			}
		}
	}
	p.m[f] = &pendingTarget{t: t, decided: now}
}

func (p *pendingFlows) take(f netstack.Flow) (Target, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.m[f]
	delete(p.m, f)
	if !ok {
		return Target{}, false
	}
	return v.t, true
}
