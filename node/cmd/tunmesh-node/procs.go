package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/node/procs"
)

// startProcs sizes the Go scheduler as --procs says: a fixed number of
// Ps, or (auto) a procs.Governor that keeps one P while it is enough. An
// explicit GOMAXPROCS in the environment wins over auto. The returned wait
// blocks until the governor has stopped (ctx done) and restored the
// default; debug is the /debug/procs endpoint.
func startProcs(ctx context.Context, mode string, reg prometheus.Registerer, log *slog.Logger) (wait func(), debug http.Handler, err error) {
	fixed, auto, err := procs.ParseMode(mode)
	if err != nil {
		return nil, nil, fmt.Errorf("--procs: %w", err)
	}
	gauge := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tunmesh_agent_procs",
		Help: "Ps of the agent's Go scheduler (GOMAXPROCS): --procs, or what the auto governor chose.",
	})
	if err := reg.Register(gauge); err != nil {
		return nil, nil, fmt.Errorf("register procs gauge: %w", err)
	}
	if env := os.Getenv("GOMAXPROCS"); auto && env != "" {
		log.Info("--procs auto off: GOMAXPROCS is set in the environment", "gomaxprocs", env)
		auto, fixed = false, runtime.GOMAXPROCS(0)
	}
	if !auto {
		runtime.GOMAXPROCS(fixed)
		gauge.Set(float64(fixed))
		return func() {}, procs.Handler(nil), nil
	}
	g := &procs.Governor{
		Policy:   procs.DefaultPolicy(runtime.GOMAXPROCS(0)),
		Interval: 250 * time.Millisecond,
		Log:      log.With("component", "procs"),
		OnChange: func(n int) { gauge.Set(float64(n)) },
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := g.Run(ctx); err != nil && ctx.Err() == nil {
			log.Warn("procs governor stopped; running with the default GOMAXPROCS", "err", err)
		}
	})
	return wg.Wait, procs.Handler(g), nil
}
