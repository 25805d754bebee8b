package agent

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/node/workers"
)

func TestWorkerMetrics(t *testing.T) {
	pool := workers.New(workers.Options{})
	t.Cleanup(pool.Close)
	reg := prometheus.NewRegistry()
	if err := registerWorkerMetrics(reg, pool); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	running := make(chan struct{}, 2)
	for range 2 {
		pool.Go(func() { running <- struct{}{}; <-release })
	}
	<-running
	<-running
	got := gatherWorkers(t, reg)
	if got["busy"] != 2 || got["idle"] != 0 {
		t.Fatalf("while two tasks run: %v, want busy 2, idle 0", got)
	}
	close(release)
	// The workers park just after their tasks return.
	deadline := time.Now().Add(5 * time.Second)
	for pool.Stats().Busy != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("workers still busy: %+v", pool.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	got = gatherWorkers(t, reg)
	if got["busy"] != 0 || got["idle"] != 2 {
		t.Fatalf("after the tasks: %v, want busy 0, idle 2", got)
	}
	if err := registerWorkerMetrics(reg, pool); err == nil {
		t.Fatal("registering twice: no error")
	}
}

// gatherWorkers reads tunmesh_node_workers by state.
func gatherWorkers(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "tunmesh_node_workers" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "state" {
					got[l.GetValue()] = m.GetGauge().GetValue()
				}
			}
		}
	}
	return got
}
