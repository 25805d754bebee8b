package mesh

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// leaf signs a certificate for id with the cluster's issuer (read from the
// local cluster's files), as tunmesh-identity would.
func leaf(t *testing.T, c *e2eenv.Cluster, id spiffe.ID) tls.Certificate {
	t.Helper()
	iss, anchors, err := ca.LoadFiles(filepath.Join(e2eenv.TestRoot, c.Name, "mesh", "identity"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	authority, err := ca.New(ca.Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh"}, iss, anchors)
	if err != nil {
		t.Fatal(err)
	}
	return signed(t, func(csr []byte) ([][]byte, error) { return authority.Sign(csr, id, time.Now()) })
}

func signed(t *testing.T, sign func([]byte) ([][]byte, error)) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := sign(csr)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key}
}

// dialTunnel opens TLS to the agent of node-2 from node-1's namespace,
// presenting cert and asking for serverID.
func dialTunnel(t *testing.T, c *e2eenv.Cluster, cert *tls.Certificate, serverID spiffe.ID) (*tls.Conn, error) {
	t.Helper()
	return dialTunnelProto(t, c, cert, serverID)
}

// dialTunnelProto is dialTunnel offering ALPN protos (mux.ALPN: version 3).
func dialTunnelProto(t *testing.T, c *e2eenv.Cluster, cert *tls.Certificate, serverID spiffe.ID, protos ...string) (*tls.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := namedns.DialContext(ctx, c.State.Nodes[0].Netns, "tcp", net.JoinHostPort(c.State.Nodes[1].IP, "4143"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: serverID.DNSName("tunmesh"), InsecureSkipVerify: true, NextProtos: protos} //nolint:gosec // the test checks the server side
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tc := tls.Client(raw, cfg)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return tc, nil
}

// TestTunnelSecurity: the destination agent refuses a client whose
// certificate is valid but not the source pod's identity, a non-TLS
// client, and a certificate from a foreign CA; each refusal is counted.
func TestTunnelSecurity(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-sec")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "other", SA: "other", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
	)
	serve(t, c, pods["server"], 9600)
	serverID := spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "server"}
	clientCert := leaf(t, c, spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "client"})
	dst := netip.MustParseAddrPort(net.JoinHostPort(pods["server"].Status.PodIP, "9600"))
	errorsNow := func() float64 { return agentMetric(t, c, "node-2", "tunmesh_node_errors_total", "") }

	open := func(src string) error {
		tc, err := dialTunnel(t, c, &clientCert, serverID)
		if err != nil {
			return err
		}
		defer tc.Close()
		if err := tunnel.WriteHeader(tc, tunnel.Header{Dst: dst, Src: netip.MustParseAddr(src)}); err != nil {
			return err
		}
		return tunnel.ReadReply(tc)
	}
	// Control: the client's certificate with the client pod's address is accepted.
	if err := open(pods["client"].Status.PodIP); err != nil {
		t.Fatalf("valid tunnel refused: %v", err)
	}
	// The same valid certificate claiming another pod's address is refused.
	before := errorsNow()
	err := open(pods["other"].Status.PodIP)
	var refused *tunnel.RefusedError
	if !errors.As(err, &refused) || refused.Reason != tunnel.ReasonSourceNotOwned {
		t.Fatalf("spoofed source: got %v, want refusal %s", err, tunnel.ReasonSourceNotOwned)
	}

	// A plaintext client on :4143.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := namedns.DialContext(ctx, c.State.Nodes[0].Netns, "tcp", net.JoinHostPort(c.State.Nodes[1].IP, "4143"))
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = raw.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	if b, _ := io.ReadAll(raw); len(b) > 0 && string(b[:4]) == "HTTP" {
		t.Fatalf("plaintext client got an HTTP answer: %q", b)
	}
	raw.Close()

	// A certificate from a foreign CA with the right SPIFFE ID.
	root, rootKey, err := ca.NewRoot("foreign", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	foreignIss, err := ca.ParseIssuer(ca.EncodeCertPEM(root), mustKeyPEM(t, rootKey), mustAnchors(t, root), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := ca.New(ca.Config{}, foreignIss, mustAnchors(t, root))
	if err != nil {
		t.Fatal(err)
	}
	foreignCert := signed(t, func(csr []byte) ([][]byte, error) {
		return foreign.Sign(csr, spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "client"}, time.Now())
	})
	if tc, err := dialTunnel(t, c, &foreignCert, serverID); err == nil {
		// TLS 1.3: the client finishes first; the server's verdict arrives as an alert.
		_ = tunnel.WriteHeader(tc, tunnel.Header{Dst: dst, Src: netip.MustParseAddr(pods["client"].Status.PodIP)})
		if err := tunnel.ReadReply(tc); err == nil {
			t.Fatal("a certificate from a foreign CA was accepted")
		}
		tc.Close()
	}
	e2eenv.WaitFor(t, 10*time.Second, "refusals counted", func() error {
		if n := errorsNow(); n < before+3 {
			return errors.New("fewer than 3 new errors counted on node-2")
		}
		return nil
	})
}

// TestTunnelSecurityV3: the same checks on a hand-built version 3 client
// (one pooled mux connection): a stream claiming another pod's address, and
// one from a valid certificate of another ServiceAccount, are refused
// source-not-owned while a stream on the same connection is accepted;
// garbage frames close the connection as a protocol error. Each refusal
// and the protocol error are counted on the destination agent.
func TestTunnelSecurityV3(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-sec3")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "other", SA: "other", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
	)
	srv := serve(t, c, pods["server"], 9601)
	serverID := spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "server"}
	clientCert := leaf(t, c, spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "client"})
	otherCert := leaf(t, c, spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "other"})
	dst := netip.MustParseAddrPort(net.JoinHostPort(pods["server"].Status.PodIP, "9601"))
	metric := func(filter string) float64 { return agentMetric(t, c, "node-2", "tunmesh_node_errors_total", filter) }

	session := func(cert *tls.Certificate) *mux.Session {
		tc, err := dialTunnelProto(t, c, cert, serverID, mux.ALPN)
		if err != nil {
			t.Fatalf("v3 handshake: %v", err)
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != mux.ALPN {
			t.Fatalf("negotiated %q, want %q", p, mux.ALPN)
		}
		_ = tc.SetDeadline(time.Time{})
		s := mux.Client(tc, mux.Config{ReplyTimeout: 20 * time.Second})
		t.Cleanup(func() { s.Close(); s.Wait() })
		return s
	}
	open := func(s *mux.Session, src string) (*mux.Stream, error) {
		hdr, err := tunnel.Header{Dst: dst, Src: netip.MustParseAddr(src)}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		st, err := s.OpenStream(hdr, false)
		if err != nil {
			t.Fatalf("open stream: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		return st, st.WaitReply(ctx)
	}
	wantRefused := func(what string, err error) {
		t.Helper()
		var refused *tunnel.RefusedError
		if !errors.As(err, &refused) || refused.Reason != tunnel.ReasonSourceNotOwned {
			t.Fatalf("%s: got %v, want refusal %s", what, err, tunnel.ReasonSourceNotOwned)
		}
	}
	refusedBefore := metric(`reason="refused_` + tunnel.ReasonSourceNotOwned.String() + `"`)
	protocolBefore := metric(`reason="protocol"`)

	s := session(&clientCert)
	// Control: the client's certificate with the client pod's address.
	st, err := open(s, pods["client"].Status.PodIP)
	if err != nil {
		t.Fatalf("valid v3 stream refused: %v", err)
	}
	if _, err := st.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseWrite()
	if got, err := io.ReadAll(st); err != nil || string(got) != "hello" {
		t.Fatalf("valid v3 stream echoed %q, %v", got, err)
	}
	st.Close()
	// The same connection claiming another pod's address.
	_, err = open(s, pods["other"].Status.PodIP)
	wantRefused("v3 stream with a spoofed source", err)
	// A valid certificate of another ServiceAccount claiming the client pod.
	_, err = open(session(&otherCert), pods["client"].Status.PodIP)
	wantRefused("v3 stream from another ServiceAccount's certificate", err)
	// The refused streams' connection goes on.
	if st, err := open(s, pods["client"].Status.PodIP); err != nil {
		t.Fatalf("valid v3 stream after refusals: %v", err)
	} else {
		st.Close()
	}
	if remotes, _ := srv.seen(); len(remotes) == 0 || remotes[0].String() != pods["client"].Status.PodIP {
		t.Errorf("server pod saw %v, want only the client pod's address", remotes)
	}

	// Garbage frames after a valid v3 handshake.
	tc, err := dialTunnelProto(t, c, &clientCert, serverID, mux.ALPN)
	if err != nil {
		t.Fatalf("v3 handshake: %v", err)
	}
	_, _ = tc.Write([]byte{0x7f, 0, 0, 4, 0, 0, 0, 1, 'j', 'u', 'n', 'k'})
	_ = tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(tc); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("garbage frames: connection still open (%v)", err)
	}
	tc.Close()

	e2eenv.WaitFor(t, 10*time.Second, "v3 refusals and the protocol error counted", func() error {
		if n := metric(`reason="refused_` + tunnel.ReasonSourceNotOwned.String() + `"`); n < refusedBefore+2 {
			return fmt.Errorf("refused_source_not_owned: %v new, want 2", n-refusedBefore)
		}
		if n := metric(`reason="protocol"`); n < protocolBefore+1 {
			return errors.New("protocol error not counted")
		}
		return nil
	})
}

func mustKeyPEM(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	b, err := ca.EncodeKeyPEM(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustAnchors(t *testing.T, root *x509.Certificate) *ca.Anchors {
	t.Helper()
	a, err := ca.ParseAnchors(ca.EncodeCertPEM(root))
	if err != nil {
		t.Fatal(err)
	}
	return a
}
