package agent

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
)

// checkDebugAddr accepts only loopback listen addresses for the profiling
// endpoint: profiles reveal the agent's internals and cost CPU, so they
// are for someone on the node (or a port-forward), never the network.
func checkDebugAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("debug address %q: %w", addr, err)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.IsLoopback() {
		return fmt.Errorf("debug address %q: host must be a loopback address (127.0.0.1 or ::1)", addr)
	}
	if port == "" {
		return fmt.Errorf("debug address %q: missing port", addr)
	}
	return nil
}

// debugHandler serves net/http/pprof under /debug/pprof/ (a CPU profile:
// /debug/pprof/profile?seconds=30), and the extra handlers by path.
func debugHandler(extra map[string]http.Handler) http.Handler {
	mux := http.NewServeMux()
	for path, h := range extra {
		mux.Handle(path, h)
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
