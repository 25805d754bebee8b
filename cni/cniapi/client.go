package cniapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"
)

// ErrAgentUnavailable is wrapped by the Client's errors when nothing answers
// on the socket: the socket file does not exist or the connection is refused.
// The agent then certainly did nothing with the request.
var ErrAgentUnavailable = errors.New("tunmesh agent unavailable")

// DefaultTimeout bounds one request when NewClient is given no timeout.
const DefaultTimeout = 10 * time.Second

// Client talks to the agent over its unix socket. It is safe for concurrent
// use and holds no idle connections, so it needs no Close.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the agent listening at socketPath. Each
// request is bounded by timeout (DefaultTimeout if timeout <= 0) and by the
// context passed to the method.
func NewClient(socketPath string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	d := &net.Dialer{}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "unix", socketPath)
			if err != nil && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
				return nil, fmt.Errorf("%w: socket %q: %w", ErrAgentUnavailable, socketPath, err)
			}
			if err != nil {
				return nil, fmt.Errorf("socket %q: %w", socketPath, err)
			}
			return c, nil
		},
		// One plugin process sends one request: keep nothing idle.
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 64 << 10,
	}
	return &Client{socket: socketPath, hc: &http.Client{Transport: tr, Timeout: timeout}}
}

// Socket returns the socket path the client dials.
func (c *Client) Socket() string { return c.socket }

// Add hands a new pod to the agent.
func (c *Client) Add(ctx context.Context, req AddRequest) (AddResponse, error) {
	var resp AddResponse
	if err := c.do(ctx, http.MethodPost, PathAdd, req, &resp); err != nil {
		return AddResponse{}, err
	}
	if resp.Meshed && (resp.Interface == nil || resp.Interface.Name == "") {
		return AddResponse{}, fmt.Errorf("agent %s on socket %q: answered meshed without an interface", PathAdd, c.socket)
	}
	return resp, nil
}

// Del tells the agent that a pod's network is being torn down.
func (c *Client) Del(ctx context.Context, req DelRequest) error {
	return c.do(ctx, http.MethodPost, PathDel, req, nil)
}

// Check asks the agent whether a pod is still set up as it should be.
func (c *Client) Check(ctx context.Context, req CheckRequest) error {
	return c.do(ctx, http.MethodPost, PathCheck, req, nil)
}

// Status asks the agent whether it can take new pods.
func (c *Client) Status(ctx context.Context) (StatusResponse, error) {
	var resp StatusResponse
	if err := c.do(ctx, http.MethodGet, PathStatus, nil, &resp); err != nil {
		return StatusResponse{}, err
	}
	return resp, nil
}

// GC tells the agent which attachments are still in use.
func (c *Client) GC(ctx context.Context, req GCRequest) error {
	return c.do(ctx, http.MethodPost, PathGC, req, nil)
}

// do sends one request. Errors name the path and the socket; an error answer
// from the agent is returned as a wrapped *Error.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("agent %s: encode request: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	// The host is ignored: the transport always dials the socket.
	hreq, err := http.NewRequestWithContext(ctx, method, "http://tunmesh-agent"+path, body)
	if err != nil {
		return fmt.Errorf("agent %s: %w", path, err)
	}
	hreq.Header.Set(VersionHeader, strconv.Itoa(Version))
	if in != nil {
		hreq.Header.Set("Content-Type", "application/json")
	}
	hresp, err := c.hc.Do(hreq)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			// Drop net/http's `Post "http://tunmesh-agent/...":` prefix.
			err = ue.Err
		}
		if errors.Is(err, ErrAgentUnavailable) { // already names the socket
			return fmt.Errorf("agent %s: %w", path, err)
		}
		return fmt.Errorf("agent %s on socket %q: %w", path, c.socket, err)
	}
	defer hresp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(hresp.Body, MaxBodySize+1))
	if err != nil {
		return fmt.Errorf("agent %s on socket %q: read answer: %w", path, c.socket, err)
	}
	if len(data) > MaxBodySize {
		return fmt.Errorf("agent %s on socket %q: answer larger than %d bytes", path, c.socket, MaxBodySize)
	}
	if hresp.StatusCode < 200 || hresp.StatusCode > 299 {
		apiErr := &Error{}
		if err := json.Unmarshal(data, apiErr); err != nil || apiErr.Msg == "" {
			apiErr = &Error{Code: CodeGeneric, Msg: "agent answered " + hresp.Status, Details: string(bytes.TrimSpace(truncate(data, 512)))}
		}
		if apiErr.Code <= 0 {
			apiErr.Code = CodeGeneric
		}
		return fmt.Errorf("agent %s: %w", path, apiErr)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("agent %s on socket %q: decode answer: %w", path, c.socket, err)
	}
	return nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
