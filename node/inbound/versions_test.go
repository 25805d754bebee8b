package inbound

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	neturl "net/url"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// spiffeCerts issues a self-signed certificate per identity (SPIFFE URI
// and the identity's DNS name) and serves both sides' TLS configurations,
// as workload.Manager does, trusting any presented chain: these tests are
// about the tunnel, not about chain verification.
type spiffeCerts struct {
	mu    sync.Mutex
	certs map[spiffe.ID]tls.Certificate
}

func (c *spiffeCerts) cert(t testing.TB, id spiffe.ID) tls.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cert, ok := c.certs[id]; ok {
		return cert
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs:        []*neturl.URL{id.URL()},
		DNSNames:    []string{id.DNSName("tunmesh")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if c.certs == nil {
		c.certs = map[spiffe.ID]tls.Certificate{}
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	c.certs[id] = cert
	return cert
}

type testCerts struct {
	t testing.TB
	c *spiffeCerts
}

func (tc testCerts) ServerConfig(local spiffe.ID, _ func(spiffe.ID) error) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{tc.c.cert(tc.t, local)}, ClientAuth: tls.RequireAnyClientCert}
}

func (tc testCerts) ClientConfig(local, _ spiffe.ID) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{tc.c.cert(tc.t, local)}, InsecureSkipVerify: true} //nolint:gosec // test
}

// pipeDialer delivers into an echo "pod": what the tunnel sends comes back.
type pipeDialer struct{ wg *sync.WaitGroup }

func (d pipeDialer) DialTCP(_ context.Context, _ netstack.NICID, _, _ netip.AddrPort) (net.Conn, error) {
	mine, pod := tunneltest.Pipe()
	d.wg.Add(1)
	go func() { // the pod: echoes until the tunnel's end
		defer d.wg.Done()
		io.Copy(pod, pod)
		pod.CloseWrite()
		io.Copy(io.Discard, pod)
		pod.Close()
	}()
	return mine, nil
}

var loopback = netip.MustParseAddr("127.0.0.1")

// serveVersions runs an Acceptor (version 3, still accepting version 2)
// on loopback, with a meshed destination pod and a source pod on
// "node" 127.0.0.1.
func serveVersions(t *testing.T, cfg Config) (*Acceptor, *nodemetrics.Metrics, int, testCerts) {
	t.Helper()
	certs := testCerts{t, &spiffeCerts{}}
	dst := &pods.Pod{Namespace: "prod", Name: "server", Addrs: []netip.Addr{dstIP}, NIC: 3, ID: id("prod", "server")}
	cluster := fakeCluster{srcIP: {srcPod("client", "default", srcIP.String(), loopback.String(), false)}}
	m := nodemetrics.ForTest()
	var pods sync.WaitGroup
	cfg.TrustDomain, cfg.ControlNamespace = "cluster.local", "tunmesh"
	a, err := New(cfg, fakeLocal{dstIP: dst}, cluster, certs, pipeDialer{&pods}, m, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done; pods.Wait() })
	return a, m, ln.Addr().(*net.TCPAddr).Port, certs
}

func target(src netip.Addr) dialer.Target {
	return dialer.Target{SrcID: id("prod", "default"), Src: netip.AddrPortFrom(src, 40000),
		Dst: netip.AddrPortFrom(dstIP, 8080), DstID: id("prod", "server"), DstNode: loopback}
}

func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	defer c.Close()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("echo = %q, %v; want %q", got, err, msg)
	}
}

func counter(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.(prometheus.Metric).Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Counter != nil {
		return m.GetCounter().GetValue()
	}
	return m.GetGauge().GetValue()
}

// TestVersionsInterop: a version 3 agent serves version 3 clients over
// pooled connections (one handshake for many streams) and version 2
// clients (no ALPN) on the same port, one handshake each; the checks are
// the same for both.
func TestVersionsInterop(t *testing.T) {
	_, m, port, certs := serveVersions(t, Config{SourceWait: 100 * time.Millisecond})
	v2 := &dialer.Dialer{Certs: certs, MeshPort: port, ControlNamespace: "tunmesh", DisableV3: true}
	v3 := &dialer.Dialer{Certs: certs, MeshPort: port, ControlNamespace: "tunmesh"}
	t.Cleanup(v3.Close)
	ctx := t.Context()
	for i := range 3 {
		c, err := v2.Dial(ctx, target(srcIP))
		if err != nil {
			t.Fatalf("v2 dial %d: %v", i, err)
		}
		if _, ok := c.(*tunnel.FramedConn); !ok {
			t.Fatalf("v2 dial returned %T", c)
		}
		echoOnce(t, c, "hello over v2")
	}
	for i := range 5 {
		c, err := v3.Dial(ctx, target(srcIP))
		if err != nil {
			t.Fatalf("v3 dial %d: %v", i, err)
		}
		echoOnce(t, c, "hello over v3")
	}
	if got := counter(t, m.Handshakes.WithLabelValues("inbound", "v2")); got != 3 {
		t.Errorf("v2 handshakes = %v, want 3", got)
	}
	if got := counter(t, m.Handshakes.WithLabelValues("inbound", "v3")); got != 1 {
		t.Errorf("v3 handshakes = %v, want 1 (pooled)", got)
	}
	if got := counter(t, m.Opened.WithLabelValues("inbound")); got != 8 {
		t.Errorf("inbound opened = %v, want 8", got)
	}
	if got := counter(t, m.PoolConns.WithLabelValues("inbound")); got != 1 {
		t.Errorf("pooled connections = %v, want 1", got)
	}

	// The same checks on a stream: a source the client identity does not
	// own is refused, and the refusal is the stream's first read.
	c, err := v3.Dial(ctx, target(netip.MustParseAddr("10.244.9.9")))
	if err != nil {
		t.Fatalf("v3 dial: %v", err)
	}
	c.Write([]byte("sent before the verdict"))
	_, err = c.Read(make([]byte, 1))
	var refused *tunnel.RefusedError
	if !errors.As(err, &refused) || refused.Reason != tunnel.ReasonSourceNotOwned {
		t.Fatalf("stream with a foreign source: read %v, want refused (source not owned)", err)
	}
	c.Close()
	// And over version 2 the refusal comes from Dial.
	if _, err := v2.Dial(ctx, target(netip.MustParseAddr("10.244.9.9"))); !errors.As(err, &refused) {
		t.Fatalf("v2 dial with a foreign source: %v, want refused", err)
	}
}

// TestStreamLimitPerPeer: the per-peer cap counts streams, not
// connections: past it a stream is refused (busy) and counted, and the
// connection carries on.
func TestStreamLimitPerPeer(t *testing.T) {
	_, m, port, certs := serveVersions(t, Config{MaxStreamsPerPeer: 2})
	v3 := &dialer.Dialer{Certs: certs, MeshPort: port, ControlNamespace: "tunmesh"}
	t.Cleanup(v3.Close)
	var held []net.Conn
	for range 2 {
		c, err := v3.Dial(t.Context(), target(srcIP))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("held stream: %v", err)
		}
		held = append(held, c)
	}
	c, err := v3.Dial(t.Context(), target(srcIP))
	if err != nil {
		t.Fatal(err)
	}
	var refused *tunnel.RefusedError
	if _, err := c.Read(make([]byte, 1)); !errors.As(err, &refused) || refused.Reason != tunnel.ReasonBusy {
		t.Fatalf("third stream: %v, want refused busy", err)
	}
	if got := counter(t, m.Errors.WithLabelValues("limit_streams_peer")); got != 1 {
		t.Errorf("limit_streams_peer = %v, want 1", got)
	}
	held[0].Close()
	time.Sleep(50 * time.Millisecond) // the server counts the reset stream out
	c, err = v3.Dial(t.Context(), target(srcIP))
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "room again")
	held[1].Close()
}

// TestSessionProtocolErrorCounted: a peer that breaks the v3 framing has
// its connection closed, and it is counted.
func TestSessionProtocolErrorCounted(t *testing.T) {
	a := newAcceptor(t)
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.ServeSession(t.Context(), server, id("prod", "default"), id("prod", "server").DNSName("tunmesh"), nodeA)
	}()
	go io.Copy(io.Discard, client)
	client.Write([]byte{0x7f, 0, 0, 0, 0, 0, 0, 1}) // an unknown frame type
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("session still served after a protocol error")
	}
	client.Close()
	if got := counter(t, a.metrics.Errors.WithLabelValues("protocol")); got != 1 {
		t.Errorf("protocol errors = %v, want 1", got)
	}
}

// dialV3 makes a version 3 connection to the acceptor by hand (TLS with
// the mux ALPN, as the dialer's pool does).
func dialV3(t *testing.T, port int, certs testCerts) *tls.Conn {
	t.Helper()
	cfg := certs.ClientConfig(id("prod", "default"), id("prod", "server"))
	cfg.ServerName = id("prod", "server").DNSName("tunmesh")
	cfg.NextProtos = []string{mux.ALPN}
	c, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if p := c.ConnectionState().NegotiatedProtocol; p != mux.ALPN {
		t.Fatalf("negotiated %q, want %q", p, mux.ALPN)
	}
	return c
}

// TestSessionLimitPerPeer: version 3 connections from one peer are capped
// (MaxSessionsPerPeer) apart from the version 2 tunnels' cap; the one past
// it is closed and counted, and a version 2 tunnel still gets through.
func TestSessionLimitPerPeer(t *testing.T) {
	_, m, port, certs := serveVersions(t, Config{MaxSessionsPerPeer: 1})
	dialV3(t, port, certs)
	// The client's handshake ends before the server's: wait until the
	// server holds the first session (counted once acquired), or the
	// second connection could take the slot and the first be closed.
	deadline := time.Now().Add(5 * time.Second)
	for counter(t, m.Handshakes.WithLabelValues("inbound", "v3")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("first v3 session not established")
		}
		time.Sleep(time.Millisecond)
	}
	extra := dialV3(t, port, certs)
	extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("second v3 connection from the peer: read %v, want it closed", err)
	}
	if got := counter(t, m.Errors.WithLabelValues("limit_sessions_peer")); got != 1 {
		t.Errorf("limit_sessions_peer = %v, want 1", got)
	}
	v2 := &dialer.Dialer{Certs: certs, MeshPort: port, ControlNamespace: "tunmesh", DisableV3: true}
	t.Cleanup(v2.Close)
	c, err := v2.Dial(t.Context(), target(srcIP))
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "v2 still served")
}

// TestSessionReapedWithoutStreams: a v3 connection that opens no stream
// is closed (FirstOpen) and counted, so a silent peer holds no slot.
func TestSessionReapedWithoutStreams(t *testing.T) {
	_, m, port, certs := serveVersions(t, Config{FirstOpen: 50 * time.Millisecond, SessionIdle: time.Minute})
	c := dialV3(t, port, certs)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("silent v3 connection: read %v, want it closed", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for counter(t, m.Errors.WithLabelValues("session_idle")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("session_idle not counted")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEarliestNotAfter(t *testing.T) {
	now := time.Now()
	leaf := &x509.Certificate{NotAfter: now.Add(24 * time.Hour)}
	inter := &x509.Certificate{NotAfter: now.Add(time.Hour)}
	for _, tc := range []struct {
		name  string
		chain []*x509.Certificate
		want  time.Time
	}{
		{"none", nil, time.Time{}},
		{"leaf", []*x509.Certificate{leaf}, leaf.NotAfter},
		{"intermediate expires first", []*x509.Certificate{leaf, inter}, inter.NotAfter},
	} {
		if got := earliestNotAfter(tc.chain); !got.Equal(tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestResetStreamStopsItsChecks: a v3 stream the client resets while its
// source is being waited for stops waiting at once (no refusal sent for
// it, no pod dialled) and is counted reset_before_reply.
func TestResetStreamStopsItsChecks(t *testing.T) {
	a := newAcceptor(t) // SourceWait 8s
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.ServeSession(t.Context(), server, id("prod", "default"), id("prod", "server").DNSName("tunmesh"), nodeA)
	}()
	defer func() { client.Close(); <-done }()
	replies := make(chan mux.Frame, 4)
	go func() {
		for {
			f, _, err := mux.ReadFrame(client, nil)
			if err != nil {
				return
			}
			replies <- f
		}
	}()
	hdr, err := tunnel.Header{Dst: netip.AddrPortFrom(dstIP, 8080), Src: netip.MustParseAddr("10.244.9.9")}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	frame := func(typ byte, payload []byte) []byte {
		b := []byte{typ, 0, byte(len(payload) >> 8), byte(len(payload)), 0, 0, 0, 1}
		return append(b, payload...)
	}
	client.Write(append(frame(mux.FrameOpen, hdr), frame(mux.FrameReset, nil)...))
	deadline := time.Now().Add(2 * time.Second) // well before SourceWait
	for counter(t, a.metrics.Errors.WithLabelValues("reset_before_reply")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("a reset stream's source wait went on")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case f := <-replies:
		t.Fatalf("frame type %#x sent for a stream the client reset", f.Type)
	case <-time.After(50 * time.Millisecond):
	}
}
