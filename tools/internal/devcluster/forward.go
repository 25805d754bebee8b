package devcluster

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// forwarder makes the API server, which listens inside the control-plane
// namespace, reachable on the host's loopback without adding any interface
// or route to the host: it accepts on 127.0.0.1 and dials from inside the
// namespace.
type forwarder struct {
	ln     net.Listener
	netns  string
	target string
	log    *slog.Logger
	wg     sync.WaitGroup
}

func newForwarder(netns, target string, log *slog.Logger) (*forwarder, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return &forwarder{ln: ln, netns: netns, target: target, log: log}, nil
}

func (f *forwarder) addr() string { return f.ln.Addr().String() }

// run accepts until ctx ends, then closes the listener and waits for the
// copies of open connections to finish.
func (f *forwarder) run(ctx context.Context) {
	go func() { // RoutineCloseOnDone: unblocks Accept
		<-ctx.Done()
		f.ln.Close()
	}()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			break
		}
		f.wg.Add(1)
		go func() { // RoutineForwardConn: ends when either side closes
			defer f.wg.Done()
			f.forward(ctx, c)
		}()
	}
	f.wg.Wait()
}

func (f *forwarder) forward(ctx context.Context, c net.Conn) {
	defer c.Close()
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	u, err := namedns.DialContext(dctx, f.netns, "tcp", f.target)
	cancel()
	if err != nil {
		f.log.Warn("forward to api server", "err", err)
		return
	}
	defer u.Close()
	stop := context.AfterFunc(ctx, func() { c.Close(); u.Close() })
	defer stop()
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(u, c)
		if tc, ok := u.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		close(done)
	}()
	_, _ = io.Copy(c, u)
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	<-done
}
