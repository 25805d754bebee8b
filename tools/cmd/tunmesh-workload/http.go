package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

const (
	httpShutdownGrace = 5 * time.Second
	httpHeaderTimeout = 10 * time.Second
)

// runHTTP serves the test HTTP endpoints on cfg.listen until ctx is done,
// then shuts down gracefully (in-flight requests get httpShutdownGrace).
func runHTTP(ctx context.Context, cfg httpConfig, e *env) int {
	ln, err := listen(ctx, e, cfg.listen)
	if err != nil {
		e.log.Error("cannot start", "error", err)
		return exitFail
	}
	srv := &http.Server{
		Handler:           logRequests(e.log, newHTTPHandler(cfg, os.Getenv, os.Hostname)),
		ReadHeaderTimeout: httpHeaderTimeout,
		ErrorLog:          slog.NewLogLogger(e.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return serverExit(e.log, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), httpShutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		e.log.Warn("graceful shutdown incomplete; closing connections", "error", err)
		srv.Close()
	}
	<-errc // http.ErrServerClosed
	return serverExit(e.log, nil)
}

// greeter answers GET /.
type greeter struct {
	text  string // complete body if set
	name  string
	pod   string
	podIP string // empty: use the server-side address of the connection
}

// newHTTPHandler builds the routes. getenv and hostname are parameters so
// tests need not touch the process environment.
func newHTTPHandler(cfg httpConfig, getenv func(string) string, hostname func() (string, error)) http.Handler {
	host, err := hostname()
	if err != nil || host == "" {
		host = "unknown"
	}
	g := &greeter{pod: getenv("POD_NAME"), podIP: getenv("POD_IP"), name: cfg.name}
	if g.pod == "" {
		g.pod = host
	}
	if g.name == "" {
		g.name = g.pod
	}
	if cfg.hasText {
		g.text = withNewline(cfg.text)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", g.serveHTTP)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeText(w, http.StatusOK, "ok\n")
	})
	mux.HandleFunc("GET /status/{code}", serveStatus)
	mux.HandleFunc("GET /bytes/{n}", serveBytes)
	return mux
}

func (g *greeter) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if g.text != "" {
		writeText(w, http.StatusOK, g.text)
		return
	}
	ip := g.podIP
	if ip == "" {
		ip = "unknown"
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			if host, _, err := net.SplitHostPort(a.String()); err == nil {
				ip = host
			}
		}
	}
	writeText(w, http.StatusOK, fmt.Sprintf("hello from %s (pod %s ip %s)\n", g.name, g.pod, ip))
}

// serveStatus answers GET /status/{code} with that code (200-599).
func serveStatus(w http.ResponseWriter, r *http.Request) {
	code, err := strconv.Atoi(r.PathValue("code"))
	if err != nil || code < 200 || code > 599 {
		writeText(w, http.StatusBadRequest, "status code must be an integer between 200 and 599\n")
		return
	}
	if code == http.StatusNoContent || code == http.StatusNotModified {
		w.WriteHeader(code) // no body allowed
		return
	}
	writeText(w, code, fmt.Sprintf("%d %s\n", code, http.StatusText(code)))
}

// bytesChunk is the repeating a-z pattern streamed by /bytes/{n}.
var bytesChunk = func() []byte {
	b := make([]byte, 32<<10)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	return b
}()

// serveBytes answers GET /bytes/{n} with exactly n bytes of a-z pattern.
func serveBytes(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.PathValue("n"), 10, 64)
	if err != nil || n < 0 {
		writeText(w, http.StatusBadRequest, "byte count must be a non-negative integer\n")
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.WriteHeader(http.StatusOK)
	for n > 0 {
		chunk := bytesChunk[:min(n, int64(len(bytesChunk)))]
		if _, err := w.Write(chunk); err != nil {
			return // client went away
		}
		n -= int64(len(chunk))
	}
}

func writeText(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	fmt.Fprint(w, body)
}

// logRequests logs every request once it has been answered.
func logRequests(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		log.Info("request",
			"method", r.Method,
			"path", r.URL.Path,
			"remote_addr", r.RemoteAddr,
			"status", rec.status,
			"bytes", rec.bytes,
			"duration", time.Since(start))
	})
}

// statusRecorder remembers the status code and body size of a response.
type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.bytes += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
