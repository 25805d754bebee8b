// Package admin is the agent's admin HTTP API: Prometheus metrics,
// readiness, a status report for `tunmeshctl check`, and a check of the
// workload certificates against trust anchors the caller sends.
//
//	GET /metrics       Prometheus text format
//	GET /ready         200 "ok" when every readiness check passes, else 503
//	                   naming the first that fails
//	GET /status        200 application/json Status (see below)
//	POST <verify>      do the certificates chain to the anchors in the body?
//	                   Counts only, no identity names (workload.VerifyPath)
package admin

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// StatusPath serves the Status report.
const StatusPath = "/status"

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
	// Version and Node go into the Status report.
	Version, Node string
	// CNIConfDir is where the node's CNI configuration lives; its first
	// file is checked for tunmesh's plugin on every Status request.
	CNIConfDir string
	// Verify answers whether the workload certificates chain to posted
	// trust anchors (nil: not served). It must name no identity: the
	// admin API is unauthenticated.
	Verify     http.Handler
	VerifyPath string
}

// Status is the agent's report to `tunmeshctl check`, served as JSON:
//
//	{"version": "v0.3.0", "node": "node-1", "ready": true,
//	 "checks": [{"name": "informers", "ok": true}, {"name": "mesh listener", "ok": false, "error": "..."}],
//	 "cni": {"confDir": "/etc/cni/net.d", "file": "10-bridge.conflist",
//	         "plugins": ["bridge", "portmap", "tunmesh-cni"], "chained": true}}
type Status struct {
	Version string        `json:"version"`
	Node    string        `json:"node"`
	Ready   bool          `json:"ready"`
	Checks  []CheckResult `json:"checks"`
	CNI     CNIReport     `json:"cni"`
}

// CheckResult is one readiness check's outcome.
type CheckResult struct {
	Name  string `json:"name"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Report runs the checks and the CNI configuration check.
func Report(cfg Config) Status {
	st := Status{Version: cfg.Version, Node: cfg.Node, Ready: true, Checks: []CheckResult{}}
	for _, c := range cfg.Ready {
		res := CheckResult{Name: c.Name, OK: true}
		if err := c.Fn(); err != nil {
			res.OK, res.Error, st.Ready = false, err.Error(), false
		}
		st.Checks = append(st.Checks, res)
	}
	if cfg.CNIConfDir != "" {
		st.CNI = CheckCNIConf(cfg.CNIConfDir)
	}
	return st
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
	mux.HandleFunc("GET "+StatusPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(Report(cfg))
	})
	if cfg.Verify != nil {
		mux.Handle("POST "+cfg.VerifyPath, cfg.Verify)
	}
	return mux
}
