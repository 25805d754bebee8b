// Package nodemetrics holds the node agent's Prometheus metrics, shared by
// the packages of the data path (pods, outbound, inbound) so that each
// series is registered exactly once.
package nodemetrics

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the agent's own series. Labels are documented in docs/mesh.md.
type Metrics struct {
	Pods      prometheus.Gauge
	Opened    *prometheus.CounterVec // direction
	Closed    *prometheus.CounterVec // direction
	Bytes     *prometheus.CounterVec // direction, way
	Handshake prometheus.Histogram
	// Errors counts tunnel errors and refusals, by reason.
	Errors *prometheus.CounterVec
	// Passthrough counts flows left to the kernel, by reason.
	Passthrough *prometheus.CounterVec
	// Refused counts flows from pods that the agent claims but cannot
	// mesh and therefore fails closed (reset, dropped, held), by reason.
	Refused *prometheus.CounterVec
	// Ends counts how tunnelled connections ended: clean, reset,
	// truncated, error; by direction.
	Ends *prometheus.CounterVec
	// PoolConns is the pooled (version 3) tunnel connections open, by
	// direction (outbound: dialed by this agent).
	PoolConns *prometheus.GaugeVec
	// Handshakes counts mTLS handshakes between agents, by direction and
	// protocol (v2: one per pod connection; v3: one per pooled
	// connection).
	Handshakes *prometheus.CounterVec
	// HandshakeSeconds is the client's TLS handshake time.
	HandshakeSeconds prometheus.Histogram
	// Active is the meshed connections (streams) open now, by direction.
	Active *prometheus.GaugeVec
}

// New registers the metrics in reg.
func New(reg prometheus.Registerer) (*Metrics, error) {
	if reg == nil {
		return nil, errors.New("node metrics: nil registerer")
	}
	m := &Metrics{
		Pods: prometheus.NewGauge(prometheus.GaugeOpts{Name: "tunmesh_node_meshed_pods", Help: "Meshed pods attached on this node."}),
		Opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_connections_opened_total", Help: "Meshed connections opened, by direction."},
			[]string{"direction"}),
		Closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_connections_closed_total", Help: "Meshed connections closed, by direction."},
			[]string{"direction"}),
		Bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_bytes_total", Help: "Bytes through meshed connections."},
			[]string{"direction", "way"}),
		Handshake: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tunmesh_node_tunnel_setup_seconds", Help: "Stream set-up latency: from opening a meshed connection's tunnel stream to the server's accept (version 2: dial, handshake, header and reply).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 18)}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_errors_total", Help: "Tunnel errors and refusals, by reason."},
			[]string{"reason"}),
		Passthrough: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_passthrough_flows_total", Help: "Flows not meshed, by reason."},
			[]string{"reason"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_fail_closed_total", Help: "Flows and segments the mesh claims but could not carry, failed closed (reset, dropped or held), by reason."},
			[]string{"reason"}),
		Ends: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_connection_ends_total", Help: "How meshed connections ended (clean, reset, truncated, error), by direction."},
			[]string{"direction", "end"}),
		PoolConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tunmesh_node_tunnel_connections", Help: "Pooled tunnel connections (protocol v3) open, by direction."},
			[]string{"direction"}),
		Handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_tunnel_handshakes_total", Help: "mTLS handshakes between agents, by direction and protocol (v2, v3)."},
			[]string{"direction", "protocol"}),
		HandshakeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tunmesh_node_tunnel_handshake_seconds", Help: "Client-side mTLS handshake time between agents.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14)}),
		Active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tunmesh_node_connections_active", Help: "Meshed connections (tunnel streams) open, by direction."},
			[]string{"direction"}),
	}
	for _, c := range []prometheus.Collector{m.Pods, m.Opened, m.Closed, m.Bytes, m.Handshake, m.Errors, m.Passthrough, m.Refused, m.Ends, m.PoolConns, m.Handshakes, m.HandshakeSeconds, m.Active} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register agent metrics: %w", err)
		}
	}
	return m, nil
}

// ForTest returns metrics on a fresh registry, for tests of the packages
// that take a *Metrics.
func ForTest() *Metrics {
	m, err := New(prometheus.NewRegistry())
	if err != nil {
		panic(err) // a fresh registry has no conflicts
	}
	return m
}
