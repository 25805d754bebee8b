// Package cniapitest provides a fake tunmesh agent for tests of the CNI plugin
// and of code that speaks the cniapi protocol.
package cniapitest

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/tunmesh/tunmesh/cni/cniapi"
)

// Agent is a fake cniapi.Agent that records every request. Hooks are set
// before the Agent is served; a nil hook means the default behaviour noted on
// it.
type Agent struct {
	// OnAdd answers Add. Nil means: meshed, interface "tm0" in req.Netns
	// (nothing is created).
	OnAdd func(ctx context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error)
	// OnDel answers Del. Nil means success.
	OnDel func(ctx context.Context, req cniapi.DelRequest) error
	// OnCheck answers Check. Nil means success.
	OnCheck func(ctx context.Context, req cniapi.CheckRequest) error
	// OnStatus answers Status. Nil means ready.
	OnStatus func(ctx context.Context) cniapi.StatusResponse
	// OnGC answers GC. Nil means success.
	OnGC func(ctx context.Context, req cniapi.GCRequest) error

	mu       sync.Mutex
	adds     []cniapi.AddRequest
	dels     []cniapi.DelRequest
	checks   []cniapi.CheckRequest
	gcs      []cniapi.GCRequest
	statuses int
}

var _ cniapi.Agent = (*Agent)(nil)

// Add implements cniapi.Agent.
func (a *Agent) Add(ctx context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error) {
	a.mu.Lock()
	a.adds = append(a.adds, req)
	a.mu.Unlock()
	if a.OnAdd != nil {
		return a.OnAdd(ctx, req)
	}
	return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: req.Netns}}, nil
}

// Del implements cniapi.Agent.
func (a *Agent) Del(ctx context.Context, req cniapi.DelRequest) error {
	a.mu.Lock()
	a.dels = append(a.dels, req)
	a.mu.Unlock()
	if a.OnDel != nil {
		return a.OnDel(ctx, req)
	}
	return nil
}

// Check implements cniapi.Agent.
func (a *Agent) Check(ctx context.Context, req cniapi.CheckRequest) error {
	a.mu.Lock()
	a.checks = append(a.checks, req)
	a.mu.Unlock()
	if a.OnCheck != nil {
		return a.OnCheck(ctx, req)
	}
	return nil
}

// Status implements cniapi.Agent.
func (a *Agent) Status(ctx context.Context) cniapi.StatusResponse {
	a.mu.Lock()
	a.statuses++
	a.mu.Unlock()
	if a.OnStatus != nil {
		return a.OnStatus(ctx)
	}
	return cniapi.StatusResponse{Ready: true}
}

// GC implements cniapi.Agent.
func (a *Agent) GC(ctx context.Context, req cniapi.GCRequest) error {
	a.mu.Lock()
	a.gcs = append(a.gcs, req)
	a.mu.Unlock()
	if a.OnGC != nil {
		return a.OnGC(ctx, req)
	}
	return nil
}

// Adds returns the Add requests received so far.
func (a *Agent) Adds() []cniapi.AddRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.adds)
}

// Dels returns the Del requests received so far.
func (a *Agent) Dels() []cniapi.DelRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.dels)
}

// Checks returns the Check requests received so far.
func (a *Agent) Checks() []cniapi.CheckRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.checks)
}

// GCs returns the GC requests received so far.
func (a *Agent) GCs() []cniapi.GCRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.gcs)
}

// Statuses returns how many Status requests were received.
func (a *Agent) Statuses() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.statuses
}

// Serve serves a with cniapi.NewHandler on a new unix socket (made with
// cniapi.Listen in a fresh temporary directory with a short path, as socket
// paths are limited to 107 bytes) and returns the socket path. The server
// logs to t and is shut down, and the directory removed, on t's cleanup.
func Serve(t testing.TB, a cniapi.Agent) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tmcni")
	if err != nil {
		t.Fatalf("make socket dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "cni.sock")
	l, err := cniapi.Listen(path)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})).With("component", "fake-agent")
	srv := &http.Server{Handler: cniapi.NewHandler(a, log)}
	done := make(chan struct{})
	go func() { // RoutineServeFakeAgent
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("fake agent serve: %v", err)
		}
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return path
}
