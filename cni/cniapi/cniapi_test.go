package cniapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/cniapi/cniapitest"
)

func addReq() cniapi.AddRequest {
	return cniapi.AddRequest{
		ContainerID:  "c0ffee",
		Netns:        "/var/run/netns/pod-a",
		IfName:       "eth0",
		PodNamespace: "default",
		PodName:      "web-0",
		PodUID:       "0b5e0c4e-2f43-4a0e-9f2b-1b7c6a9d7e10",
		IPs:          []netip.Prefix{netip.MustParsePrefix("10.244.1.5/24"), netip.MustParsePrefix("fd00:10:244:1::5/64")},
	}
}

func TestRoundTrip(t *testing.T) {
	agent := &cniapitest.Agent{
		OnStatus: func(context.Context) cniapi.StatusResponse {
			return cniapi.StatusResponse{Ready: false, Message: "syncing informers"}
		},
	}
	c := cniapi.NewClient(cniapitest.Serve(t, agent), 5*time.Second)
	ctx := context.Background()

	resp, err := c.Add(ctx, addReq())
	if err != nil {
		t.Fatalf("Add: %v", err)
	}
	want := cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: addReq().Netns}}
	if !reflect.DeepEqual(resp, want) {
		t.Errorf("Add response = %+v, want %+v", resp, want)
	}
	if got := agent.Adds(); len(got) != 1 || !reflect.DeepEqual(got[0], addReq()) {
		t.Errorf("agent got adds %+v, want [%+v]", got, addReq())
	}

	check := cniapi.CheckRequest(addReq())
	if err := c.Check(ctx, check); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if got := agent.Checks(); len(got) != 1 || !reflect.DeepEqual(got[0], check) {
		t.Errorf("agent got checks %+v, want [%+v]", got, check)
	}

	del := cniapi.DelRequest{ContainerID: "c0ffee", IfName: "eth0", PodNamespace: "default", PodName: "web-0"}
	if err := c.Del(ctx, del); err != nil {
		t.Fatalf("Del: %v", err)
	}
	if got := agent.Dels(); len(got) != 1 || !reflect.DeepEqual(got[0], del) {
		t.Errorf("agent got dels %+v, want [%+v]", got, del)
	}

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st != (cniapi.StatusResponse{Ready: false, Message: "syncing informers"}) || agent.Statuses() != 1 {
		t.Errorf("Status = %+v after %d calls", st, agent.Statuses())
	}

	gc := cniapi.GCRequest{ValidAttachments: []cniapi.Attachment{{ContainerID: "a", IfName: "eth0"}, {ContainerID: "b", IfName: "eth0"}}}
	if err := c.GC(ctx, gc); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got := agent.GCs(); len(got) != 1 || !reflect.DeepEqual(got[0], gc) {
		t.Errorf("agent got gcs %+v, want [%+v]", got, gc)
	}
}

func TestNotMeshed(t *testing.T) {
	agent := &cniapitest.Agent{OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
		return cniapi.AddResponse{Reason: "namespace opted out"}, nil
	}}
	resp, err := cniapi.NewClient(cniapitest.Serve(t, agent), 0).Add(context.Background(), addReq())
	if err != nil {
		t.Fatalf("Add: %v", err)
	}
	if resp.Meshed || resp.Interface != nil || resp.Reason != "namespace opted out" {
		t.Errorf("Add response = %+v", resp)
	}
}

func TestAgentErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		agentErr func() error
		code     int
		msg      string
	}{
		{"try again later", func() error { return cniapi.Errorf(cniapi.CodeTryAgainLater, "agent starting") }, 11, "agent starting"},
		{"wrapped code", func() error {
			return fmt.Errorf("set up pod: %w", &cniapi.Error{Code: 7, Msg: "bad mtu", Details: "mtu 10"})
		}, 7, "bad mtu"},
		{"plain error", func() error { return errors.New("netlink: operation not permitted") }, 999, "netlink: operation not permitted"},
		{"zero code", func() error { return &cniapi.Error{Msg: "no code"} }, 999, "no code"},
		{"deadline", func() error { return fmt.Errorf("enter netns: %w", context.DeadlineExceeded) }, 11, "deadline exceeded"},
		{"panic", func() error { panic("boom") }, 999, "agent internal error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent := &cniapitest.Agent{
				OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
					return cniapi.AddResponse{}, tc.agentErr()
				},
				OnDel: func(context.Context, cniapi.DelRequest) error { return tc.agentErr() },
			}
			c := cniapi.NewClient(cniapitest.Serve(t, agent), 5*time.Second)
			_, addErr := c.Add(context.Background(), addReq())
			delErr := c.Del(context.Background(), cniapi.DelRequest{ContainerID: "c", IfName: "eth0"})
			for _, err := range []error{addErr, delErr} {
				var apiErr *cniapi.Error
				if !errors.As(err, &apiErr) {
					t.Fatalf("error %v (%T) is not a *cniapi.Error", err, err)
				}
				if apiErr.Code != tc.code || !strings.Contains(apiErr.Msg, tc.msg) {
					t.Errorf("error = %+v, want code %d and msg containing %q", apiErr, tc.code, tc.msg)
				}
				if errors.Is(err, cniapi.ErrAgentUnavailable) {
					t.Errorf("agent error %v wraps ErrAgentUnavailable", err)
				}
			}
		})
	}
}

func TestHandlerRefuses(t *testing.T) {
	valid := `{"containerID":"c","netns":"/run/netns/p","ifName":"eth0","podNamespace":"ns","podName":"p"}`
	for _, tc := range []struct {
		name    string
		method  string
		path    string
		version string
		body    string
		status  int
		msg     string
	}{
		{"ok", "POST", cniapi.PathAdd, "1", valid, 200, ""},
		{"missing version", "POST", cniapi.PathAdd, "", valid, 400, "missing Tunmesh-CNI-Version"},
		{"future version", "POST", cniapi.PathAdd, "2", valid, 400, `unsupported Tunmesh-CNI-Version "2"`},
		{"garbage version", "GET", cniapi.PathStatus, "one", "", 400, `unsupported Tunmesh-CNI-Version "one"`},
		{"unknown field", "POST", cniapi.PathAdd, "1", `{"containerID":"c","hostNetwork":true}`, 400, `unknown field "hostNetwork"`},
		{"trailing data", "POST", cniapi.PathDel, "1", `{"containerID":"c"} {}`, 400, "trailing data"},
		{"not json", "POST", cniapi.PathCheck, "1", `containerID=c`, 400, "decode request"},
		{"empty body", "POST", cniapi.PathGC, "1", ``, 400, "decode request"},
		{"missing fields", "POST", cniapi.PathAdd, "1", `{"containerID":"c"}`, 400, `missing "netns", "ifName", "podNamespace", "podName"`},
		{"relative netns", "POST", cniapi.PathCheck, "1", strings.Replace(valid, "/run/netns/p", "p", 1), 400, "not an absolute path"},
		{"del without id", "POST", cniapi.PathDel, "1", `{"ifName":"eth0"}`, 400, `missing "containerID"`},
		{"gc without id", "POST", cniapi.PathGC, "1", `{"validAttachments":[{"ifName":"eth0"}]}`, 400, `validAttachments[0]: missing "containerID"`},
		{"too large", "POST", cniapi.PathAdd, "1", `{"containerID":"` + strings.Repeat("x", cniapi.MaxBodySize) + `"}`, 413, "larger than"},
		{"wrong method", "GET", cniapi.PathAdd, "1", "", 405, "method GET not allowed"},
		{"unknown path", "POST", "/v2/add", "1", valid, 404, "unknown path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agent := &cniapitest.Agent{}
			h := cniapi.NewHandler(agent, nil)
			r := httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body))
			if tc.version != "" {
				r.Header.Set(cniapi.VersionHeader, tc.version)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tc.status {
				t.Fatalf("status = %d, want %d; body %s", w.Code, tc.status, w.Body)
			}
			if got := w.Header().Get(cniapi.VersionHeader); got != "1" {
				t.Errorf("response %s = %q, want 1", cniapi.VersionHeader, got)
			}
			if tc.status == 200 {
				return
			}
			if got := w.Header().Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type = %q", got)
			}
			var e cniapi.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil {
				t.Fatalf("body %s: %v", w.Body, err)
			}
			if e.Code != cniapi.CodeGeneric || !strings.Contains(e.Msg, tc.msg) {
				t.Errorf("error = %+v, want code 999 and %q", e, tc.msg)
			}
			if n := len(agent.Adds()) + len(agent.Dels()) + len(agent.Checks()) + len(agent.GCs()); n != 0 {
				t.Errorf("refused request reached the agent (%d calls)", n)
			}
		})
	}
}

func TestMeshedWithoutInterface(t *testing.T) {
	agent := &cniapitest.Agent{OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
		return cniapi.AddResponse{Meshed: true}, nil
	}}
	_, err := cniapi.NewClient(cniapitest.Serve(t, agent), 0).Add(context.Background(), addReq())
	var apiErr *cniapi.Error
	if !errors.As(err, &apiErr) || apiErr.Code != cniapi.CodeGeneric || !strings.Contains(apiErr.Msg, "without an interface") {
		t.Errorf("Add error = %v, want a code 999 error about the missing interface", err)
	}
}

func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tmcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// staleSocket leaves a socket file that nothing listens on.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
}

func TestClientAgentUnavailable(t *testing.T) {
	dir := shortTempDir(t)
	missing := filepath.Join(dir, "missing.sock")
	stale := filepath.Join(dir, "stale.sock")
	staleSocket(t, stale)

	for name, path := range map[string]string{"missing socket": missing, "refused": stale} {
		t.Run(name, func(t *testing.T) {
			c := cniapi.NewClient(path, time.Second)
			if c.Socket() != path {
				t.Errorf("Socket() = %q", c.Socket())
			}
			_, addErr := c.Add(context.Background(), addReq())
			_, statusErr := c.Status(context.Background())
			for _, err := range []error{addErr, statusErr, c.Del(context.Background(), cniapi.DelRequest{ContainerID: "c"})} {
				if !errors.Is(err, cniapi.ErrAgentUnavailable) {
					t.Errorf("error %v does not wrap ErrAgentUnavailable", err)
				}
				if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("%q", path)) {
					t.Errorf("error %q does not name the socket %q", err, path)
				}
				if err != nil && strings.Contains(err.Error(), "http://") {
					t.Errorf("error %q leaks the dummy URL", err)
				}
			}
		})
	}
}

func TestClientTimeout(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	agent := &cniapitest.Agent{OnAdd: func(ctx context.Context, _ cniapi.AddRequest) (cniapi.AddResponse, error) {
		select {
		case <-ctx.Done():
		case <-release:
		}
		return cniapi.AddResponse{}, ctx.Err()
	}}
	c := cniapi.NewClient(cniapitest.Serve(t, agent), 200*time.Millisecond)
	start := time.Now()
	_, err := c.Add(context.Background(), addReq())
	if err == nil {
		t.Fatal("Add succeeded against a stuck agent")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("Add took %v with a 200ms timeout", time.Since(start))
	}
	var netErr net.Error
	if !errors.Is(err, context.DeadlineExceeded) && !(errors.As(err, &netErr) && netErr.Timeout()) {
		t.Errorf("error %v (%T) is not a timeout", err, err)
	}
	if errors.Is(err, cniapi.ErrAgentUnavailable) {
		t.Errorf("timeout %v wraps ErrAgentUnavailable", err)
	}
}

func TestClientNonJSONError(t *testing.T) {
	dir := shortTempDir(t)
	path := filepath.Join(dir, "proxy.sock")
	l, err := cniapi.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "upstream exploded", http.StatusBadGateway)
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(l) }()
	t.Cleanup(func() { srv.Close(); <-done })

	_, err = cniapi.NewClient(path, time.Second).Status(context.Background())
	var apiErr *cniapi.Error
	if !errors.As(err, &apiErr) || apiErr.Code != 999 || !strings.Contains(apiErr.Msg, "502") || apiErr.Details != "upstream exploded" {
		t.Errorf("error = %#v", err)
	}
}

func TestListen(t *testing.T) {
	dir := shortTempDir(t)

	t.Run("creates parent and restricts mode", func(t *testing.T) {
		path := filepath.Join(dir, "a", "b", "cni.sock")
		l, err := cniapi.Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
			t.Errorf("socket mode = %v, want socket 0600", fi.Mode())
		}
		pi, err := os.Stat(filepath.Dir(path))
		if err != nil {
			t.Fatal(err)
		}
		if pi.Mode().Perm() != 0o755 {
			t.Errorf("parent mode = %v, want 0755", pi.Mode().Perm())
		}
		// Bound in a private directory and renamed into place: nothing
		// of that is left behind, and it still answers at path.
		ents, _ := os.ReadDir(filepath.Dir(path))
		if len(ents) != 1 {
			t.Errorf("parent holds %d entries, want only the socket", len(ents))
		}
		go func() {
			if c, err := l.Accept(); err == nil {
				c.Close()
			}
		}()
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("dial the renamed socket: %v", err)
		}
		c.Close()
		l.Close()
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("socket left after Close: %v", err)
		}
	})

	t.Run("replaces stale socket", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		staleSocket(t, path)
		l, err := cniapi.Listen(path)
		if err != nil {
			t.Fatalf("Listen over a stale socket: %v", err)
		}
		l.Close()
	})

	t.Run("refuses socket in use", func(t *testing.T) {
		path := filepath.Join(dir, "busy.sock")
		l, err := cniapi.Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if l2, err := cniapi.Listen(path); err == nil {
			l2.Close()
			t.Fatal("second Listen on a live socket succeeded")
		} else if !strings.Contains(err.Error(), "in use") {
			t.Errorf("error = %v", err)
		}
	})

	t.Run("refuses regular file", func(t *testing.T) {
		path := filepath.Join(dir, "file")
		if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
			t.Fatal(err)
		}
		if l, err := cniapi.Listen(path); err == nil {
			l.Close()
			t.Fatal("Listen replaced a regular file")
		}
		if b, _ := os.ReadFile(path); !bytes.Equal(b, []byte("keep me")) {
			t.Error("regular file was changed")
		}
	})
}

// FuzzHandler feeds arbitrary bodies to every endpoint: the handler must never
// panic and must answer one of the statuses of the protocol.
func FuzzHandler(f *testing.F) {
	f.Add(0, []byte(`{"containerID":"c","netns":"/run/netns/p","ifName":"eth0","podNamespace":"ns","podName":"p","ips":["10.0.0.1/24"]}`))
	f.Add(1, []byte(`{"containerID":"c","ifName":"eth0"}`))
	f.Add(3, []byte(`{"validAttachments":[{"containerID":"c","ifName":"eth0"}]}`))
	f.Add(0, []byte(`{"ips":["10.0.0.1"]}`))
	paths := []string{cniapi.PathAdd, cniapi.PathDel, cniapi.PathCheck, cniapi.PathGC}
	h := cniapi.NewHandler(&cniapitest.Agent{}, nil)
	f.Fuzz(func(t *testing.T, which int, body []byte) {
		path := paths[uint(which)%uint(len(paths))]
		r := httptest.NewRequest("POST", path, bytes.NewReader(body))
		r.Header.Set(cniapi.VersionHeader, "1")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		switch w.Code {
		case 200, 204, 400, 413:
		default:
			t.Fatalf("POST %s %q: status %d: %s", path, body, w.Code, w.Body)
		}
	})
}
