package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	pods        prometheus.Gauge
	opened      *prometheus.CounterVec
	closed      *prometheus.CounterVec
	bytes       *prometheus.CounterVec
	handshake   prometheus.Histogram
	errors      *prometheus.CounterVec
	passthrough *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		pods: prometheus.NewGauge(prometheus.GaugeOpts{Name: "tunmesh_node_meshed_pods", Help: "Meshed pods attached on this node."}),
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_connections_opened_total", Help: "Meshed connections opened, by direction."},
			[]string{"direction"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_connections_closed_total", Help: "Meshed connections closed, by direction."},
			[]string{"direction"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_bytes_total", Help: "Bytes through meshed connections."},
			[]string{"direction", "way"}),
		handshake: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tunmesh_node_tunnel_setup_seconds", Help: "Time to dial, handshake and open a tunnel.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_errors_total", Help: "Tunnel errors and refusals, by reason."},
			[]string{"reason"}),
		passthrough: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_node_passthrough_flows_total", Help: "Flows not meshed, by reason."},
			[]string{"reason"}),
	}
	for _, c := range []prometheus.Collector{m.pods, m.opened, m.closed, m.bytes, m.handshake, m.errors, m.passthrough} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register agent metrics: %w", err)
		}
	}
	return m, nil
}
