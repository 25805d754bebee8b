package cniapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Agent is what the node agent implements to serve the plugin. Methods are
// called concurrently, one goroutine per request; ctx ends when the plugin
// hangs up.
//
// An error may be (or wrap) an *Error to choose the CNI code reported to the
// runtime; context.DeadlineExceeded becomes CodeTryAgainLater and anything
// else CodeGeneric.
type Agent interface {
	// Add sets up a new pod, or answers that it is not meshed. It must be
	// idempotent: the runtime may repeat an ADD.
	Add(ctx context.Context, req AddRequest) (AddResponse, error)
	// Del releases a pod. It must succeed when the pod, its network
	// namespace or the agent's state for it is already gone.
	Del(ctx context.Context, req DelRequest) error
	// Check verifies that a pod is still set up as it should be.
	Check(ctx context.Context, req CheckRequest) error
	// Status reports whether the agent can take new pods.
	Status(ctx context.Context) StatusResponse
	// GC releases everything not held by one of req.ValidAttachments.
	GC(ctx context.Context, req GCRequest) error
}

// NewHandler serves a over the protocol. log may be nil (no logging).
// The handler checks the version header, bounds the body to MaxBodySize,
// decodes strictly (unknown fields and trailing data are errors), checks the
// required fields and answers errors as JSON Error bodies.
func NewHandler(a Agent, log *slog.Logger) http.Handler {
	if a == nil {
		panic("cniapi: NewHandler with nil Agent")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &handler{agent: a, log: log}
}

type handler struct {
	agent Agent
	log   *slog.Logger
}

// route is one endpoint: its method, and serve, which decodes the request,
// calls the agent and returns the response body (nil for 204) or an error.
type route struct {
	method string
	serve  func(h *handler, r *http.Request) (any, []any, error)
}

var routes = map[string]route{
	PathAdd:    {http.MethodPost, (*handler).serveAdd},
	PathDel:    {http.MethodPost, (*handler).serveDel},
	PathCheck:  {http.MethodPost, (*handler).serveCheck},
	PathStatus: {http.MethodGet, (*handler).serveStatus},
	PathGC:     {http.MethodPost, (*handler).serveGC},
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	w.Header().Set(VersionHeader, strconv.Itoa(Version))

	rt, ok := routes[r.URL.Path]
	switch {
	case !ok:
		h.refuse(w, r, http.StatusNotFound, Errorf(CodeGeneric, "unknown path %q", r.URL.Path))
		return
	case r.Method != rt.method:
		w.Header().Set("Allow", rt.method)
		h.refuse(w, r, http.StatusMethodNotAllowed, Errorf(CodeGeneric, "method %s not allowed on %q", r.Method, r.URL.Path))
		return
	}
	if err := checkVersion(r.Header.Get(VersionHeader)); err != nil {
		h.refuse(w, r, http.StatusBadRequest, err)
		return
	}
	if r.Body != nil {
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodySize)
	}

	body, attrs, err := h.call(rt, r)
	attrs = append(attrs, "op", r.URL.Path, "duration", time.Since(start))
	if err != nil {
		status, apiErr := errorStatus(err)
		h.log.Warn("cni request failed", append(attrs, "status", status, "err", err)...)
		writeJSON(w, status, apiErr)
		return
	}
	h.log.Info("cni request", attrs...)
	if body == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	writeJSON(w, http.StatusOK, body)
}

// call runs rt.serve, turning a panic in the agent into an error so that the
// plugin gets an answer rather than a dropped connection.
func (h *handler) call(rt route, r *http.Request) (body any, attrs []any, err error) {
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.Error("cni handler panic", "op", r.URL.Path, "panic", p, "stack", string(debug.Stack()))
			err = Errorf(CodeGeneric, "agent internal error")
		}
	}()
	return rt.serve(h, r)
}

func (h *handler) serveAdd(r *http.Request) (any, []any, error) {
	var req AddRequest
	if err := decode(r.Body, &req); err != nil {
		return nil, nil, err
	}
	attrs := podAttrs(req.ContainerID, req.PodNamespace, req.PodName)
	if err := checkPodRequest(req.ContainerID, req.Netns, req.IfName, req.PodNamespace, req.PodName); err != nil {
		return nil, attrs, err
	}
	resp, err := h.agent.Add(r.Context(), req)
	if err != nil {
		return nil, attrs, err
	}
	if err := checkAddResponse(resp); err != nil {
		return nil, attrs, err
	}
	return resp, append(attrs, "meshed", resp.Meshed), nil
}

func (h *handler) serveDel(r *http.Request) (any, []any, error) {
	var req DelRequest
	if err := decode(r.Body, &req); err != nil {
		return nil, nil, err
	}
	attrs := podAttrs(req.ContainerID, req.PodNamespace, req.PodName)
	if req.ContainerID == "" {
		return nil, attrs, &badRequest{errors.New("missing \"containerID\"")}
	}
	return nil, attrs, h.agent.Del(r.Context(), req)
}

func (h *handler) serveCheck(r *http.Request) (any, []any, error) {
	var req CheckRequest
	if err := decode(r.Body, &req); err != nil {
		return nil, nil, err
	}
	attrs := podAttrs(req.ContainerID, req.PodNamespace, req.PodName)
	if err := checkPodRequest(req.ContainerID, req.Netns, req.IfName, req.PodNamespace, req.PodName); err != nil {
		return nil, attrs, err
	}
	return nil, attrs, h.agent.Check(r.Context(), req)
}

func (h *handler) serveStatus(r *http.Request) (any, []any, error) {
	st := h.agent.Status(r.Context())
	return st, []any{"ready", st.Ready}, nil
}

func (h *handler) serveGC(r *http.Request) (any, []any, error) {
	var req GCRequest
	if err := decode(r.Body, &req); err != nil {
		return nil, nil, err
	}
	attrs := []any{"valid_attachments", len(req.ValidAttachments)}
	for i, a := range req.ValidAttachments {
		if a.ContainerID == "" {
			return nil, attrs, &badRequest{fmt.Errorf("validAttachments[%d]: missing \"containerID\"", i)}
		}
	}
	return nil, attrs, h.agent.GC(r.Context(), req)
}

func podAttrs(containerID, namespace, name string) []any {
	return []any{"container_id", containerID, "pod_namespace", namespace, "pod", name}
}

// badRequest marks an error as the client's fault (HTTP 400).
type badRequest struct{ err error }

func (e *badRequest) Error() string { return e.err.Error() }
func (e *badRequest) Unwrap() error { return e.err }

// checkVersion accepts exactly Version.
func checkVersion(v string) *Error {
	if v == "" {
		return Errorf(CodeGeneric, "missing %s header (agent speaks version %d)", VersionHeader, Version)
	}
	if n, err := strconv.Atoi(strings.TrimSpace(v)); err != nil || n != Version {
		return Errorf(CodeGeneric, "unsupported %s %q (agent speaks version %d)", VersionHeader, v, Version)
	}
	return nil
}

// checkPodRequest checks the fields that ADD and CHECK require.
func checkPodRequest(containerID, netns, ifName, podNamespace, podName string) error {
	var missing []string
	for _, f := range []struct{ name, value string }{
		{"containerID", containerID},
		{"netns", netns},
		{"ifName", ifName},
		{"podNamespace", podNamespace},
		{"podName", podName},
	} {
		if f.value == "" {
			missing = append(missing, strconv.Quote(f.name))
		}
	}
	if len(missing) > 0 {
		return &badRequest{fmt.Errorf("missing %s", strings.Join(missing, ", "))}
	}
	if !filepath.IsAbs(netns) {
		return &badRequest{fmt.Errorf("\"netns\" %q is not an absolute path", netns)}
	}
	return nil
}

// checkAddResponse catches an Agent that answers Meshed without naming the
// interface; the plugin could not report it.
func checkAddResponse(resp AddResponse) error {
	if resp.Meshed && (resp.Interface == nil || resp.Interface.Name == "") {
		return Errorf(CodeGeneric, "agent answered meshed without an interface")
	}
	return nil
}

// decode reads exactly one JSON value into v, refusing unknown fields.
func decode(body io.Reader, v any) error {
	if body == nil {
		return &badRequest{errors.New("empty request body")}
	}
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &badRequest{fmt.Errorf("decode request: %w", err)}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if err == nil {
			err = errors.New("trailing data after JSON value")
		}
		return &badRequest{fmt.Errorf("decode request: %w", err)}
	}
	return nil
}

// errorStatus is the one place that maps an error to an HTTP status and the
// Error sent to the plugin.
func errorStatus(err error) (int, *Error) {
	var (
		apiErr  *Error
		bad     *badRequest
		tooBig  *http.MaxBytesError
		errBody = &Error{Code: CodeGeneric, Msg: err.Error()}
	)
	switch {
	case errors.As(err, &tooBig):
		return http.StatusRequestEntityTooLarge, Errorf(CodeGeneric, "request body larger than %d bytes", tooBig.Limit)
	case errors.As(err, &bad):
		return http.StatusBadRequest, errBody
	case errors.As(err, &apiErr):
		out := *apiErr
		if out.Code <= 0 {
			out.Code = CodeGeneric
		}
		if out.Code == CodeTryAgainLater {
			return http.StatusServiceUnavailable, &out
		}
		return http.StatusInternalServerError, &out
	case errors.Is(err, context.DeadlineExceeded):
		errBody.Code = CodeTryAgainLater
		return http.StatusServiceUnavailable, errBody
	default:
		return http.StatusInternalServerError, errBody
	}
}

// refuse answers a request that never reached the agent.
func (h *handler) refuse(w http.ResponseWriter, r *http.Request, status int, e *Error) {
	h.log.Warn("cni request refused", "op", r.URL.Path, "method", r.Method, "status", status, "err", e.Msg)
	writeJSON(w, status, e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil { // only our own plain types are marshalled
		status = http.StatusInternalServerError
		b = []byte(`{"code":999,"msg":"agent could not encode its answer"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// Listen listens on the unix socket at path for the agent: it creates the
// parent directory (0755) if needed, replaces a stale socket left by a previous
// agent, refuses to replace a socket that still answers or a file that is not
// a socket, and makes the socket 0600 (root only: the plugin runs as root).
//
// The socket never exists at path with a looser mode: it is bound inside a
// fresh 0700 directory next to path, made 0600 there, and renamed into place
// (a chmod after Listen would leave a window in which anyone could connect).
func Listen(path string) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("listen cni socket: empty path")
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	private, err := os.MkdirTemp(dir, ".cni-sock-")
	if err != nil { // MkdirTemp creates it 0700
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	defer os.RemoveAll(private)
	tmp := filepath.Join(private, "s")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	ul := l.(*net.UnixListener)
	// The file is renamed away: closing must not try to remove tmp, and
	// removing path on Close is done by unlinkListener.
	ul.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen cni socket %q: %w", path, err)
	}
	return &unlinkListener{UnixListener: ul, path: path}, nil
}

// unlinkListener removes the socket file when closed, as a UnixListener
// does for the path it was bound to.
type unlinkListener struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (l *unlinkListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { _ = os.Remove(l.path) })
	return err
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("exists and is not a socket (mode %s)", fi.Mode())
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return errors.New("socket is in use by a running agent")
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}
