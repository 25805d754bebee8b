package observe

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/access"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, cn string) testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return testCA{c, key}
}

func (ca testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

func (ca testCA) client(t *testing.T, cn string, eku x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn, Organization: []string{"system:masters"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{eku}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestClientCertificatesThroughTLS: a client certificate reaches Gate as
// a user only when the cluster's client CA (as it is now) signed it for
// client auth; another CA's or a server-only certificate is refused at the
// handshake, and without client CAs a certificate is not even asked for.
func TestClientCertificatesThroughTLS(t *testing.T) {
	cluster, other := newTestCA(t, "cluster"), newTestCA(t, "other")
	var pool atomic.Pointer[x509.CertPool]
	gate := &access.Gate{Reviewer: nil, ClientCAs: pool.Load}
	cfg, _, err := TLSConfig("node-a", netip.MustParseAddr("127.0.0.1"), nil, pool.Load)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, err := gate.Authenticate(r)
		if err != nil {
			http.Error(w, err.Error(), access.Status(err))
			return
		}
		io.WriteString(w, u.Name+" "+u.Method)
	}))
	srv.TLS = cfg
	srv.StartTLS()
	t.Cleanup(srv.Close)
	call := func(cert *tls.Certificate) (string, error) {
		c := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
		if cert != nil { // offered whatever CAs the server names
			c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: c}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get(srv.URL)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.Status + " " + strings.TrimSpace(string(b)), nil
	}
	admin := cluster.client(t, "kubernetes-admin", x509.ExtKeyUsageClientAuth)
	if got, err := call(&admin); err != nil || !strings.HasPrefix(got, "401") {
		t.Fatalf("no client CAs yet: %q, %v; want the certificate ignored (401)", got, err)
	}
	pool.Store(cluster.pool()) // the ConfigMap was read: no restart
	if got, err := call(&admin); err != nil || got != "200 OK kubernetes-admin x509" {
		t.Fatalf("cluster CA's client certificate: %q, %v", got, err)
	}
	foreign := other.client(t, "kubernetes-admin", x509.ExtKeyUsageClientAuth)
	if got, err := call(&foreign); err == nil {
		t.Fatalf("another CA's certificate accepted: %q", got)
	}
	serverOnly := cluster.client(t, "kubernetes-admin", x509.ExtKeyUsageServerAuth)
	if got, err := call(&serverOnly); err == nil {
		t.Fatalf("a certificate without the client-auth usage accepted: %q", got)
	}
	if got, err := call(nil); err != nil || !strings.HasPrefix(got, "401") {
		t.Fatalf("no certificate, no token: %q, %v; want 401", got, err)
	}
}
