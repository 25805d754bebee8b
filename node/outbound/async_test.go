package outbound

import (
	"context"
	"io"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// heldConn is a pod connection as netstack hands it over: read on demand
// and holdable (netstack.Conn.Hold).
type heldConn struct {
	*tunneltest.ReadyConn
	held     atomic.Int32
	released chan struct{}
}

func (c *heldConn) Hold() (func(), bool) {
	c.held.Add(1)
	return func() { close(c.released) }, true
}

// TestServeConnHeldReturnsAtOnce: a holdable pod connection is spliced in
// the background and ServeConn returns while it is open (no goroutine
// waits for an idle connection); the bytes flow both ways, and at the end
// the accounting runs and the hold and the pod's connection slot are
// given back.
func TestServeConnHeldReturnsAtOnce(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	certs.ready.Store(true)
	a, b := tunneltest.Pipe()
	client := mux.Client(a, mux.Config{})
	server := mux.Server(b, mux.Config{}, echo)
	t.Cleanup(func() { client.Close(); server.Close(); client.Wait(); server.Wait() })
	h, m := newTestHandler(t, d, certs, streamDialer{client})
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("HandleFlow = %s", got)
	}
	agentSide, pod := tunneltest.ReadyPipe()
	c := &heldConn{ReadyConn: agentSide, released: make(chan struct{})}
	returned := make(chan struct{})
	go func() { h.ServeConn(context.Background(), c, f); close(returned) }()
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return while the connection is open")
	}
	if c.held.Load() != 1 {
		t.Fatalf("Hold called %d times, want 1", c.held.Load())
	}
	if n := h.activeConns(1); n != 1 {
		t.Errorf("pod's open meshed connections %d while it is open, want 1", n)
	}
	if _, err := pod.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(pod, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	pod.CloseWrite()
	if rest, err := io.ReadAll(pod); err != nil || len(rest) != 0 {
		t.Fatalf("after the echo: %q, %v; want a clean end", rest, err)
	}
	select {
	case <-c.released:
	case <-time.After(5 * time.Second):
		t.Fatal("hold not released at the end")
	}
	if c.Aborted() {
		t.Error("pod connection reset after a clean end")
	}
	if n := h.activeConns(1); n != 0 {
		t.Errorf("pod's open meshed connections %d after the end, want 0", n)
	}
	if got := counterValue(m.Ends.WithLabelValues("outbound", "clean")); got != 1 {
		t.Errorf("ends{clean} = %v, want 1", got)
	}
	if got := counterValue(m.Bytes.WithLabelValues("outbound", "sent")); got != 4 {
		t.Errorf("bytes sent = %v, want 4", got)
	}
}

// echo accepts a stream, sends back what it reads and ends cleanly.
func echo(st *mux.Stream) {
	if err := st.Accept(); err != nil {
		return
	}
	io.Copy(st, st)
	st.CloseWrite()
	st.Close()
}
