package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/node/workers"
)

// registerWorkerMetrics exports the worker pool's size as
// tunmesh_node_workers{state="idle"|"busy"}: the pool's goroutines are
// bounded, not per connection, and an operator who counts the agent's
// goroutines can tell them apart.
func registerWorkerMetrics(reg prometheus.Registerer, pool *workers.Pool) error {
	for _, g := range []struct {
		state string
		count func(workers.Stats) int
	}{
		{"idle", func(st workers.Stats) int { return st.Idle }},
		{"busy", func(st workers.Stats) int { return st.Busy }},
	} {
		gauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "tunmesh_node_workers",
			Help:        "Goroutines of the agent's worker pool (per-connection work runs on them), idle or busy.",
			ConstLabels: prometheus.Labels{"state": g.state},
		}, func() float64 { return float64(g.count(pool.Stats())) })
		if err := reg.Register(gauge); err != nil {
			return fmt.Errorf("register worker pool metrics: %w", err)
		}
	}
	return nil
}
