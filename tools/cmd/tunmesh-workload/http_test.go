package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestHTTPGet(t *testing.T) {
	t.Parallel()
	addr := startServer(t, "http", "--listen", "127.0.0.1:0", "--name", "web")
	base := "http://" + addr

	t.Run("greeting", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", base+"/")
		if r.code != exitOK {
			t.Fatalf("code %d; stderr:\n%s", r.code, r.stderr)
		}
		// POD_IP is unset in tests, so the server reports its local address.
		if !strings.HasPrefix(r.stdout, "hello from web (pod ") || !strings.HasSuffix(r.stdout, " ip 127.0.0.1)\n") {
			t.Errorf("stdout = %q", r.stdout)
		}
		if !strings.Contains(r.stderr, "msg=response") || !strings.Contains(r.stderr, "status=200") {
			t.Errorf("stderr lacks response log:\n%s", r.stderr)
		}
	})
	t.Run("scheme added", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", addr+"/healthz")
		if r.code != exitOK || r.stdout != "ok\n" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("count and interval", func(t *testing.T) {
		t.Parallel()
		start := time.Now()
		r := runMode(t, "get", base+"/healthz", "--count", "3", "--interval", "30ms")
		if r.code != exitOK || r.stdout != "ok\nok\nok\n" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
		if d := time.Since(start); d < 60*time.Millisecond {
			t.Errorf("3 requests with 30ms interval took only %v", d)
		}
	})
	t.Run("expected non-200 status", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", base+"/status/503", "--expect-status", "503")
		if r.code != exitOK || r.stdout != "503 Service Unavailable\n" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("status mismatch fails", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", base+"/status/500")
		if r.code != exitFail {
			t.Errorf("code %d, want %d", r.code, exitFail)
		}
		if r.stdout != "500 Internal Server Error\n" {
			t.Errorf("stdout %q, want the body anyway", r.stdout)
		}
		if !strings.Contains(r.stderr, "got status 500, want 200") {
			t.Errorf("stderr lacks mismatch:\n%s", r.stderr)
		}
	})
	t.Run("one failure among many fails", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", base+"/status/204", "--count", "2", "--interval", "0", "--expect-status", "200")
		if r.code != exitFail || strings.Count(r.stderr, `msg="request failed"`) != 2 {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("bytes", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", base+"/bytes/100000")
		if r.code != exitOK || len(r.stdout) != 100000 {
			t.Fatalf("code %d, %d bytes; stderr:\n%s", r.code, len(r.stdout), r.stderr)
		}
		if !strings.HasPrefix(r.stdout, "abcdefghijklmnopqrstuvwxyzabc") {
			t.Errorf("unexpected pattern %q", r.stdout[:40])
		}
	})
	t.Run("connection refused", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "get", "http://"+freeClosedPort(t)+"/")
		if r.code != exitFail || !strings.Contains(r.stderr, `msg="request failed"`) {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("forever keeps going and exits 0 when cancelled", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(300*time.Millisecond, cancel)
		r := runModeCtx(t, ctx, "get", base+"/status/404", "--count", "0", "--interval", "20ms")
		if r.code != exitOK {
			t.Errorf("code %d, want 0; stderr:\n%s", r.code, r.stderr)
		}
		if n := strings.Count(r.stderr, `msg="request failed"`); n < 2 {
			t.Errorf("only %d failed requests logged; stderr:\n%s", n, r.stderr)
		}
	})
	t.Run("interrupted count fails", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(100*time.Millisecond, cancel)
		r := runModeCtx(t, ctx, "get", base+"/healthz", "--count", "5", "--interval", "1h")
		if r.code != exitFail || !strings.Contains(r.stderr, "interrupted before all requests") {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("server logs requests", func(t *testing.T) {
		t.Parallel()
		logs := newLogWatch()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan int, 1)
		go func() { done <- run(ctx, []string{"http", "--listen", "127.0.0.1:0"}, io.Discard, logs) }()
		a := <-logs.addr
		if r := runMode(t, "get", "http://"+a+"/status/418", "--expect-status", "418"); r.code != exitOK {
			t.Errorf("get: code %d; stderr:\n%s", r.code, r.stderr)
		}
		cancel()
		if code := <-done; code != exitOK {
			t.Errorf("server exit code %d", code)
		}
		out := logs.String()
		for _, want := range []string{"msg=request", "method=GET", "path=/status/418", "remote_addr=127.0.0.1:", "status=418", `msg="shut down"`} {
			if !strings.Contains(out, want) {
				t.Errorf("server logs lack %q:\n%s", want, out)
			}
		}
	})
}

func TestGetTimeout(t *testing.T) {
	t.Parallel()
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(block)
	start := time.Now()
	r := runMode(t, "get", srv.URL, "--timeout", "150ms")
	if r.code != exitFail || !strings.Contains(r.stderr, "timed out after 150ms") {
		t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("get took %v despite --timeout 150ms", d)
	}
}

func TestHTTPHandler(t *testing.T) {
	t.Parallel()
	env := func(vars map[string]string) func(string) string {
		return func(k string) string { return vars[k] }
	}
	host := func() (string, error) { return "node-1", nil }
	tests := []struct {
		name       string
		cfg        httpConfig
		vars       map[string]string
		method     string
		path       string
		wantStatus int
		wantBody   string
	}{
		{"pod env", httpConfig{}, map[string]string{"POD_NAME": "web-abc", "POD_IP": "10.1.2.3"},
			"GET", "/", 200, "hello from web-abc (pod web-abc ip 10.1.2.3)\n"},
		{"name flag", httpConfig{name: "front"}, map[string]string{"POD_NAME": "web-abc", "POD_IP": "10.1.2.3"},
			"GET", "/", 200, "hello from front (pod web-abc ip 10.1.2.3)\n"},
		{"hostname fallback", httpConfig{}, map[string]string{"POD_IP": "10.1.2.3"},
			"GET", "/", 200, "hello from node-1 (pod node-1 ip 10.1.2.3)\n"},
		{"text", httpConfig{text: "v2", hasText: true}, nil, "GET", "/", 200, "v2\n"},
		{"healthz", httpConfig{}, nil, "GET", "/healthz", 200, "ok\n"},
		{"status", httpConfig{}, nil, "GET", "/status/302", 302, "302 Found\n"},
		{"status no content", httpConfig{}, nil, "GET", "/status/204", 204, ""},
		{"status invalid", httpConfig{}, nil, "GET", "/status/abc", 400, "status code must be an integer between 200 and 599\n"},
		{"status out of range", httpConfig{}, nil, "GET", "/status/100", 400, "status code must be an integer between 200 and 599\n"},
		{"bytes", httpConfig{}, nil, "GET", "/bytes/30", 200, "abcdefghijklmnopqrstuvwxyzabcd"},
		{"bytes zero", httpConfig{}, nil, "GET", "/bytes/0", 200, ""},
		{"bytes invalid", httpConfig{}, nil, "GET", "/bytes/-1", 400, "byte count must be a non-negative integer\n"},
		{"not found", httpConfig{}, nil, "GET", "/nope", 404, "404 page not found\n"},
		{"method not allowed", httpConfig{}, nil, "POST", "/", 405, "Method Not Allowed\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHTTPHandler(tt.cfg, env(tt.vars), host)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tt.method, tt.path, nil))
			if rec.Code != tt.wantStatus || rec.Body.String() != tt.wantBody {
				t.Errorf("%s %s = %d %q, want %d %q", tt.method, tt.path, rec.Code, rec.Body.String(), tt.wantStatus, tt.wantBody)
			}
		})
	}
}
