package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/resolve"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

type fakeCerts struct{ ready atomic.Bool }

func (f *fakeCerts) Certificate(ctx context.Context, _ spiffe.ID) (*tls.Certificate, error) {
	for !f.ready.Load() {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return &tls.Certificate{}, nil
}

type fakeDialer struct {
	err  error
	seen chan dialer.Target // when set, receives every target
}

func (f fakeDialer) Dial(_ context.Context, t dialer.Target) (net.Conn, error) {
	if f.seen != nil {
		f.seen <- t
	}
	return nil, f.err
}

type noTrack struct{}

func (noTrack) Track(resolve.Endpoint) func() { return func() {} }

// abortConn records whether the pod's connection was reset or closed.
type abortConn struct {
	net.Conn
	aborted, closed atomic.Bool
}

func (c *abortConn) Abort()       { c.aborted.Store(true) }
func (c *abortConn) Close() error { c.closed.Store(true); return nil }

func newTestHandler(t *testing.T, d *Decider, certs Certs, dl Dialer) (*Handler, *nodemetrics.Metrics) {
	t.Helper()
	m := nodemetrics.ForTest()
	h, err := NewHandler(d, dl, noTrack{}, certs, Options{SyncWait: 200 * time.Millisecond, CertWait: 200 * time.Millisecond}, m, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return h, m
}

// TestHandleFlowWaitsForCertificate (task c): the first flow of an identity
// whose certificate is not issued waits for it; if it comes in time the
// flow is meshed, otherwise refused with a reset and counted. Never
// passthrough.
func TestHandleFlowWaitsForCertificate(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	h, m := newTestHandler(t, d, certs, fakeDialer{})
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))

	start := time.Now()
	if got := h.HandleFlow(f); got != netstack.Reset {
		t.Fatalf("no certificate: HandleFlow = %s, want reset", got)
	}
	if waited := time.Since(start); waited < 150*time.Millisecond {
		t.Errorf("refused after %v, want it to wait for the certificate first", waited)
	}
	if n := counterValue(m.Refused.WithLabelValues(ReasonNoCertificate)); n != 1 {
		t.Errorf("fail-closed counter %v, want 1", n)
	}

	go func() { time.Sleep(50 * time.Millisecond); certs.ready.Store(true) }()
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("certificate arriving while waiting: HandleFlow = %s, want terminate", got)
	}
}

// TestHandleFlowBeforeSync (item 1): a flow arriving before the view has
// synced waits for it; still unsynced it is dropped (the pod retransmits),
// never passed through.
func TestHandleFlowBeforeSync(t *testing.T) {
	d, _ := fixture()
	var synced atomic.Bool
	d.Synced = synced.Load
	certs := &fakeCerts{}
	certs.ready.Store(true)
	h, m := newTestHandler(t, d, certs, fakeDialer{})
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))
	if got := h.HandleFlow(f); got != netstack.Drop {
		t.Fatalf("unsynced: HandleFlow = %s, want drop", got)
	}
	if n := counterValue(m.Refused.WithLabelValues(ReasonNotSynced)); n != 1 {
		t.Errorf("fail-closed counter %v, want 1", n)
	}
	go func() { time.Sleep(50 * time.Millisecond); synced.Store(true) }()
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("synced while waiting: HandleFlow = %s, want terminate", got)
	}
}

// TestServeConnResetsOnDialFailure: a terminated flow whose tunnel cannot
// be opened is reset, not closed (a clean close would look like an empty
// successful response).
func TestServeConnResetsOnDialFailure(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	certs.ready.Store(true)
	h, _ := newTestHandler(t, d, certs, fakeDialer{err: &tunnel.RefusedError{Reason: tunnel.ReasonPolicy}})
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("HandleFlow = %s", got)
	}
	c := &abortConn{}
	h.ServeConn(context.Background(), c, f)
	if !c.aborted.Load() {
		t.Fatal("pod connection not reset after a refused tunnel")
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// TestPodConnectionLimit (item 8): a pod at its cap of concurrent meshed
// connections gets new ones refused (reset) and counted; other pods are
// not affected.
func TestPodConnectionLimit(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	certs.ready.Store(true)
	m := nodemetrics.ForTest()
	h, err := NewHandler(d, fakeDialer{}, noTrack{}, certs, Options{MaxConnsPerPod: 2}, m, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if !h.enter(1) || !h.enter(1) {
		t.Fatal("below the cap")
	}
	if h.enter(1) {
		t.Fatal("entered past the cap")
	}
	if got := h.HandleFlow(fl(1, netip.AddrPortFrom(meshedIP, 8080))); got != netstack.Reset {
		t.Fatalf("pod at its cap: HandleFlow = %s, want reset", got)
	}
	if n := counterValue(m.Refused.WithLabelValues(ReasonPodConnLimit)); n != 1 {
		t.Errorf("limit counter %v, want 1", n)
	}
	if got := h.HandleFlow(fl(2, netip.AddrPortFrom(meshedIP, 8080))); got != netstack.Terminate {
		t.Fatalf("another pod: HandleFlow = %s, want terminate", got)
	}
	h.exit(1)
	if got := h.HandleFlow(fl(1, netip.AddrPortFrom(meshedIP, 8080))); got != netstack.Terminate {
		t.Fatalf("below the cap again: HandleFlow = %s, want terminate", got)
	}
}

// TestDualStackHeaderSource (smaller hole): the tunnel header names the
// source address the pod actually used, of the flow's family, not the
// pod's first address (an IPv6 flow from a dual-stack pod failed).
func TestDualStackHeaderSource(t *testing.T) {
	d, c := fixture()
	src6 := netip.MustParseAddr("fd00:10:244:1::2")
	dst6 := netip.MustParseAddr("fd00:10:244:2::3")
	c.pods[dst6] = pod("prod", "server6", dst6.String(), "192.168.0.3", nil)
	p := *d.Local.(fakeLocal)[1]
	p.Addrs = []netip.Addr{clientAddr, src6}
	d.Local.(fakeLocal)[1] = &p
	certs := &fakeCerts{}
	certs.ready.Store(true)
	seen := make(chan dialer.Target, 1)
	h, _ := newTestHandler(t, d, certs, fakeDialer{err: errors.New("stop"), seen: seen})
	f := netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(src6, 40000), Dst: netip.AddrPortFrom(dst6, 8080)}
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("HandleFlow = %s", got)
	}
	h.ServeConn(context.Background(), &abortConn{}, f)
	if tg := <-seen; tg.Src.Addr() != src6 {
		t.Fatalf("header source %s, want the flow's %s", tg.Src, src6)
	}
}

// streamDialer opens streams of a real version 3 session whose server
// refuses every stream with reason.
type streamDialer struct{ client *mux.Session }

func (d streamDialer) Dial(context.Context, dialer.Target) (net.Conn, error) {
	return d.client.OpenStream([]byte("header"), false)
}

// podConn is the pod's side: a working connection that records a reset.
type podConn struct {
	net.Conn
	aborted atomic.Bool
}

func (c *podConn) Abort() { c.aborted.Store(true); c.Conn.Close() }

// TestServeConnStreamRefusalResetsPod: over version 3 the refusal is the
// stream's first read (no round trip before data); it still resets the
// pod's connection and is counted like a refused dial.
func TestServeConnStreamRefusalResetsPod(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	certs.ready.Store(true)
	a, b := tunneltest.Pipe()
	client := mux.Client(a, mux.Config{})
	server := mux.Server(b, mux.Config{}, func(st *mux.Stream) { st.Refuse(tunnel.ReasonPolicy) })
	t.Cleanup(func() { client.Close(); server.Close(); client.Wait(); server.Wait() })
	h, m := newTestHandler(t, d, certs, streamDialer{client})
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("HandleFlow = %s", got)
	}
	agentSide, pod := tunneltest.Pipe()
	c := &podConn{Conn: agentSide}
	go pod.Write([]byte("request sent before the verdict"))
	h.ServeConn(context.Background(), c, f)
	if !c.aborted.Load() {
		t.Fatal("pod connection not reset after a refused stream")
	}
	if got := counterValue(m.Errors.WithLabelValues("refused_" + tunnel.ReasonPolicy.String())); got != 1 {
		t.Errorf("refused counter = %v, want 1", got)
	}
	if got := counterValue(m.Ends.WithLabelValues("outbound", "refused")); got != 1 {
		t.Errorf("ends{refused} = %v, want 1", got)
	}
	pod.Close()
}
