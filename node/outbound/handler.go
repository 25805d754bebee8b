package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/resolve"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// Dialer opens tunnels (dialer.Dialer).
type Dialer interface {
	Dial(ctx context.Context, t dialer.Target) (*tls.Conn, error)
}

// Tracker counts active streams per endpoint (resolve.Resolver).
type Tracker interface {
	Track(ep resolve.Endpoint) (done func())
}

// Handler is the netstack.FlowHandler for flows from local pods: it asks
// the Decider and serves the flows it meshes.
type Handler struct {
	decider *Decider
	dialer  Dialer
	tracker Tracker
	metrics *nodemetrics.Metrics
	log     *slog.Logger
	pending pendingFlows
}

// NewHandler checks its dependencies.
func NewHandler(d *Decider, dl Dialer, tr Tracker, m *nodemetrics.Metrics, log *slog.Logger) (*Handler, error) {
	if d == nil || dl == nil || tr == nil || m == nil || log == nil {
		return nil, errors.New("outbound handler: nil dependency")
	}
	return &Handler{decider: d, dialer: dl, tracker: tr, metrics: m, log: log, pending: pendingFlows{m: map[netstack.Flow]*pendingTarget{}}}, nil
}

// HandleFlow implements netstack.FlowHandler.
func (h *Handler) HandleFlow(f netstack.Flow) netstack.Decision {
	d := h.decider.Decide(f)
	switch d.Verdict {
	case Mesh:
		h.pending.put(f, d.Target)
		return netstack.Terminate
	default:
		h.metrics.Passthrough.WithLabelValues(d.Reason).Inc()
		h.log.Debug("connection not meshed", "src", f.Src.String(), "dst", f.Dst.String(), "tls", false, "reason", d.Reason)
		return netstack.Passthrough
	}
}

// ServeConn carries a terminated flow to the destination node's agent.
func (h *Handler) ServeConn(ctx context.Context, conn net.Conn, f netstack.Flow) {
	defer conn.Close()
	t, ok := h.pending.take(f)
	if !ok {
		return
	}
	if t.Endpoint != nil {
		done := h.tracker.Track(*t.Endpoint)
		defer done()
	}
	start := time.Now()
	tc, err := h.dialer.Dial(ctx, dialer.Target{SrcID: t.Src.ID, Src: f.Src, Dst: t.Dst, DstID: t.DstID, DstNode: t.DstNode})
	if err != nil {
		var refused *tunnel.RefusedError
		if errors.As(err, &refused) {
			h.metrics.Errors.WithLabelValues("refused_" + refused.Reason.String()).Inc()
		}
		h.metrics.Errors.WithLabelValues("dial").Inc()
		h.log.Warn("mesh dial failed", "src", f.Src.String(), "dst", t.Dst.String(), "identity", t.DstID.String(), "err", err)
		return
	}
	h.metrics.Handshake.Observe(time.Since(start).Seconds())
	h.metrics.Opened.WithLabelValues("outbound").Inc()
	stats, err := tunnel.Splice(ctx, conn, tc, tunnel.SpliceOptions{IdleTimeout: time.Hour})
	h.metrics.Closed.WithLabelValues("outbound").Inc()
	h.metrics.Bytes.WithLabelValues("outbound", "sent").Add(float64(stats.AToB))
	h.metrics.Bytes.WithLabelValues("outbound", "received").Add(float64(stats.BToA))
	h.log.Info("connection closed", "direction", "outbound", "src_pod", t.Src.FullName(),
		"client_id", t.Src.ID.String(), "server_id", t.DstID.String(), "dst", t.Dst.String(), "tls", true,
		"bytes_sent", stats.AToB, "bytes_received", stats.BToA, "duration", time.Since(start), "err", err)
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
