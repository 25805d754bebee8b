// Package admin is the agent's admin HTTP API: Prometheus metrics,
// readiness, and the identities' certificate chains.
package admin

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one readiness condition: nil when fine, else why not.
type Check struct {
	Name string
	Fn   func() error
}

// Config lists what the admin API serves.
type Config struct {
	Gatherer prometheus.Gatherer
	// Ready lists the conditions of readiness; all must pass.
	Ready []Check
	// Certificates serves the identities' chains (nil: not served).
	Certificates     http.Handler
	CertificatesPath string
}

// Handler returns the admin API's handler.
func Handler(cfg Config) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		for _, c := range cfg.Ready {
			if err := c.Fn(); err != nil {
				http.Error(w, c.Name+": "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	if cfg.Certificates != nil {
		mux.Handle("GET "+cfg.CertificatesPath, cfg.Certificates)
	}
	return mux
}
