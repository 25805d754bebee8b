package dialer

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// peer is a mesh peer on loopback: version 3 (echoing streams) when v3,
// else version 2 (header, reply, echo). It counts connections and can
// cut them all.
type peer struct {
	addr  netip.Addr
	port  int
	conns atomic.Int32

	mu   sync.Mutex // guards open
	open []net.Conn
}

func (p *peer) cutAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.open {
		c.(*tls.Conn).NetConn().Close()
	}
	p.open = nil
}

func startPeer(t *testing.T, v3 bool) *peer { return startPeerStalling(t, v3, nil) }

// startPeerStalling is startPeer whose streams, while stall is open,
// accept and then read nothing (pods that do not read).
func startPeerStalling(t *testing.T, v3 bool, stall chan struct{}) *peer {
	t.Helper()
	_, server := tunneltest.TLSConfigs(t)
	server = server.Clone()
	server.ClientAuth = tls.RequireAnyClientCert
	if v3 {
		server.NextProtos = []string{mux.ALPN}
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	p := &peer{}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); p.cutAll(); wg.Wait() })
	wg.Add(1)
	go func() { // RoutinePeer: ends when the listener closes
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.conns.Add(1)
			p.mu.Lock()
			p.open = append(p.open, c)
			p.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				if tc.ConnectionState().NegotiatedProtocol == mux.ALPN {
					s := mux.Server(tc, mux.Config{}, func(st *mux.Stream) {
						st.Accept()
						if stall != nil {
							select {
							case <-stall:
							case <-st.Session().Done():
							}
						}
						io.Copy(st, st)
						st.CloseWrite()
						st.Close()
					})
					<-s.Done()
					s.Wait()
					return
				}
				if _, err := tunnel.ReadHeader(tc); err != nil {
					return
				}
				tunnel.WriteReply(tc, tunnel.ReasonNone)
				f := tunnel.NewFramedConn(tc)
				io.Copy(f, f)
				f.CloseWrite()
				f.Close()
			}()
		}
	}()
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	p.addr, p.port = ap.Addr(), int(ap.Port())
	return p
}

func newTestDialer(t *testing.T, p *peer) *Dialer {
	client, _ := tunneltest.TLSConfigs(t)
	d := &Dialer{Certs: testCerts{client}, MeshPort: p.port, ControlNamespace: "tunmesh", Metrics: nodemetrics.ForTest()}
	t.Cleanup(d.Close)
	return d
}

func tgt(p *peer) Target {
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "default"}
	return Target{SrcID: id, Src: netip.MustParseAddrPort("10.244.1.2:40000"), Dst: netip.MustParseAddrPort("10.244.2.3:8080"), DstID: id, DstNode: p.addr}
}

func roundTrip(t *testing.T, c net.Conn) {
	t.Helper()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// TestPoolReusesConnections: streams of one key share one connection
// while it has room; past MaxStreamsPerConn another one opens, up to
// MaxConnsPerKey.
func TestPoolReusesConnections(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	d.MaxStreamsPerConn, d.MaxConnsPerKey = 3, 2
	var open []net.Conn
	for i := range 8 {
		c, err := d.Dial(t.Context(), tgt(p))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if _, ok := c.(*mux.Stream); !ok {
			t.Fatalf("dial returned %T, want a stream", c)
		}
		roundTrip(t, c)
		open = append(open, c)
	}
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections for 8 streams (3 per connection, at most 2), want 2", got)
	}
	for _, c := range open {
		c.Close()
	}
	c, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c)
	c.Close()
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections after the streams ended, want still 2 (reused)", got)
	}
}

// TestPoolConcurrentFirstDial: many streams to a new key at once cost one
// handshake, not one each.
func TestPoolConcurrentFirstDial(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := d.Dial(context.Background(), tgt(p))
			if err != nil {
				errs <- err
				return
			}
			c.Write([]byte("x"))
			_, err = io.ReadFull(c, make([]byte, 1))
			c.Close()
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := p.conns.Load(); got != 1 {
		t.Errorf("peer saw %d connections for 20 concurrent first streams, want 1", got)
	}
}

// TestPoolCutAndRedial: a broken connection cuts its streams (an error,
// never a clean end) and the next Dial opens a new connection.
func TestPoolCutAndRedial(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	c, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c)
	p.cutAll()
	_, err = io.ReadAll(c)
	if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read after the cut = %v, want a cut (io.ErrUnexpectedEOF)", err)
	}
	if got := tunnel.EndOf(err); got != "truncated" {
		t.Errorf("EndOf = %q", got)
	}
	c, err = d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c)
	c.Close()
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections, want 2 (redialed)", got)
	}
}

// TestPoolIdleConnectionsClose: Run closes connections without streams
// after IdleTimeout, and not those with streams.
func TestPoolIdleConnectionsClose(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	d.IdleTimeout = 100 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() { cancel(); <-done }()
	busy, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, busy)
	time.Sleep(300 * time.Millisecond)
	if got := d.Conns(); got != 1 {
		t.Fatalf("pooled connections with an open stream = %d, want 1", got)
	}
	roundTrip(t, busy)
	busy.Close()
	deadline := time.Now().Add(2 * time.Second)
	for d.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("idle connection still open after %v", 2*time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var m dto.Metric
	if err := d.Metrics.PoolConns.WithLabelValues("outbound").Write(&m); err != nil || m.GetGauge().GetValue() != 0 {
		t.Errorf("pooled connections gauge = %v (%v), want 0 after the idle close", m.GetGauge().GetValue(), err)
	}
	if err := d.Metrics.Handshakes.WithLabelValues("outbound", "v3").Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("v3 handshakes = %v (%v), want 1", m.GetCounter().GetValue(), err)
	}
}

// TestV2PeerFallback: a peer that selects no ALPN (version 2) gets one
// connection per stream, framed, and works.
func TestV2PeerFallback(t *testing.T) {
	p := startPeer(t, false)
	d := newTestDialer(t, p)
	for i := range 3 {
		c, err := d.Dial(t.Context(), tgt(p))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if _, ok := c.(*tunnel.FramedConn); !ok {
			t.Fatalf("dial to a v2 peer returned %T, want *tunnel.FramedConn", c)
		}
		roundTrip(t, c)
		c.(interface{ CloseWrite() error }).CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
	}
	if got := p.conns.Load(); got != 3 {
		t.Errorf("v2 peer saw %d connections for 3 streams, want 3", got)
	}
	if got := d.Conns(); got != 0 {
		t.Errorf("%d pooled connections to a v2 peer", got)
	}
}

// TestPoolSpreadsBytesInFlight: a connection with most of its window in
// flight (bulk transfers to pods that do not keep up) is saturated: the
// next stream of the key opens another connection.
func TestPoolSpreadsBytesInFlight(t *testing.T) {
	stall := make(chan struct{})
	p := startPeerStalling(t, true, stall)
	defer close(stall)
	d := newTestDialer(t, p)
	var open []net.Conn
	for _, n := range []int{mux.StreamWindow, mux.StreamWindow, mux.StreamWindow, 1} {
		c, err := d.Dial(t.Context(), tgt(p))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(make([]byte, n)); err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
	}
	if got := p.conns.Load(); got != 1 {
		t.Fatalf("peer saw %d connections before the window filled, want 1", got)
	}
	c, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	open = append(open, c)
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections with 12 MiB + 1 in flight on the first, want 2", got)
	}
	for _, c := range open {
		c.Close()
	}
}

// TestPoolPastMaxConnsPerKey: past MaxConnsPerKey streams share the least
// loaded connection, but never more than a server takes per connection
// (mux.DefaultMaxStreams): then another connection opens.
func TestPoolPastMaxConnsPerKey(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	d.MaxStreamsPerConn, d.MaxConnsPerKey = 1, 1
	var open []net.Conn
	for i := range mux.DefaultMaxStreams {
		c, err := d.Dial(t.Context(), tgt(p))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		open = append(open, c)
	}
	if got := p.conns.Load(); got != 1 {
		t.Fatalf("peer saw %d connections for %d streams with MaxConnsPerKey 1, want 1", got, mux.DefaultMaxStreams)
	}
	c, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	open = append(open, c)
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections once the first was at the server's cap, want 2", got)
	}
	roundTrip(t, c)
	for _, c := range open {
		c.Close()
	}
}

// renewingCerts serves the current client configuration; renew swaps in
// another certificate, as the workload manager does at 70% of a
// certificate's life.
type renewingCerts struct{ cur atomic.Pointer[tls.Config] }

func (c *renewingCerts) ClientConfig(_, _ spiffe.ID) *tls.Config {
	cfg := c.cur.Load().Clone()
	cfg.InsecureSkipVerify = true
	return cfg
}

func (c *renewingCerts) renew(t *testing.T) {
	client, _ := tunneltest.TLSConfigs(t)
	c.cur.Store(client)
}

// TestPoolDrainsOldConnections: a pooled connection takes no new stream
// once it is MaxConnAge old or its client certificate has been renewed
// (the next stream opens a new connection); the streams it carries go
// on, and it closes once they have ended.
func TestPoolDrainsOldConnections(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(*Dialer, *renewingCerts)
		age   func(*testing.T, *renewingCerts)
	}{
		{"max age", func(d *Dialer, _ *renewingCerts) { d.MaxConnAge = 100 * time.Millisecond },
			func(*testing.T, *renewingCerts) { time.Sleep(150 * time.Millisecond) }},
		{"certificate renewed", func(*Dialer, *renewingCerts) {},
			func(t *testing.T, c *renewingCerts) { c.renew(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPeer(t, true)
			certs := &renewingCerts{}
			certs.renew(t)
			d := &Dialer{Certs: certs, MeshPort: p.port, ControlNamespace: "tunmesh", IdleTimeout: time.Hour}
			t.Cleanup(d.Close)
			tc.setup(d, certs)
			old, err := d.Dial(t.Context(), tgt(p))
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(t, old)
			tc.age(t, certs)
			fresh, err := d.Dial(t.Context(), tgt(p))
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(t, fresh)
			if got := p.conns.Load(); got != 2 {
				t.Fatalf("peer saw %d connections, want 2: the old one drained", got)
			}
			roundTrip(t, old) // a drained connection's streams go on
			old.Close()
			deadline := time.Now().Add(2 * time.Second)
			for d.Conns() != 1 {
				if time.Now().After(deadline) {
					t.Fatalf("%d pooled connections, want the drained one closed", d.Conns())
				}
				d.reap(time.Hour)
				time.Sleep(10 * time.Millisecond)
			}
			roundTrip(t, fresh)
			fresh.Close()
		})
	}
}

// TestPoolUsesThePeersStreamCap: past MaxConnsPerKey, a connection takes
// streams up to the configured server cap (PeerMaxStreamsPerConn), not
// mux's default, before another opens.
func TestPoolUsesThePeersStreamCap(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	d.MaxStreamsPerConn, d.MaxConnsPerKey, d.PeerMaxStreamsPerConn = 1, 1, 2
	var open []net.Conn
	for i := range 3 {
		c, err := d.Dial(t.Context(), tgt(p))
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		roundTrip(t, c)
		open = append(open, c)
	}
	if got := p.conns.Load(); got != 2 {
		t.Errorf("peer saw %d connections for 3 streams with a server cap of 2, want 2", got)
	}
	for _, c := range open {
		c.Close()
	}
}
