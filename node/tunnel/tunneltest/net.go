package tunneltest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/rawio"
)

// TCPPair returns both ends of a fresh loopback TCP connection on 127.0.0.1.
// Both are closed when the test ends.
func TCPPair(tb testing.TB) (client, server *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	type accepted struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- accepted{c, err}
	}()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	acc := <-ch
	if acc.err != nil {
		client.Close()
		tb.Fatalf("accept: %v", acc.err)
	}
	tb.Cleanup(func() {
		client.Close()
		acc.c.Close()
	})
	return client, acc.c
}

// TLSConfigs returns a TLS 1.3-only client and server configuration that
// trust each other through one fresh self-signed ECDSA P-256 certificate for
// "tunnel.test", used by both sides, with client certificates required: the
// shape of the mesh's mTLS without the identity machinery.
func TLSConfigs(tb testing.TB) (client, server *tls.Config) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("generate key: %v", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tunnel.test"},
		DNSNames:              []string{"tunnel.test"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatalf("create certificate: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("parse certificate: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	client = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   "tunnel.test",
	}
	server = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}
	return client, server
}

// TLSPair returns both ends of a loopback TLS 1.3 connection (see TLSConfigs)
// with the handshake done on both sides. Both are closed when the test ends.
func TLSPair(tb testing.TB) (client, server *tls.Conn) {
	tb.Helper()
	ccfg, scfg := TLSConfigs(tb)
	c, s := TCPPair(tb)
	// Over raw-I/O connections, as the agents' tunnels are (node/dialer,
	// node/inbound): their reads and writes, and the corked bulk writes
	// of mux sessions, are what the tests exercise.
	rc, err := rawio.NewConn(c)
	if err != nil {
		tb.Fatal(err)
	}
	rs, err := rawio.NewConn(s)
	if err != nil {
		tb.Fatal(err)
	}
	client, server = tls.Client(rc, ccfg), tls.Server(rs, scfg)
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	cerr := client.Handshake()
	serr := <-errc
	if cerr != nil || serr != nil {
		tb.Fatalf("tls handshake: client: %v, server: %v", cerr, serr)
	}
	if v := client.ConnectionState().Version; v != tls.VersionTLS13 {
		tb.Fatalf("tls version %#x, want TLS 1.3", v)
	}
	tb.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}
