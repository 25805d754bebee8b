package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// t0 is the fixed "now" of most tests; whole seconds, because certificates
// carry no finer time.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const day = 24 * time.Hour

var testID = spiffe.ID{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "web"}

// testPKI is a root, an issuer under it and the parsed forms of both.
type testPKI struct {
	root      *x509.Certificate
	rootKey   *ecdsa.PrivateKey
	issuer    *x509.Certificate
	issuerKey *ecdsa.PrivateKey
	anchors   *Anchors
	iss       *Issuer
}

func newTestPKI(t *testing.T, now time.Time) *testPKI {
	t.Helper()
	root, rootKey, err := NewRoot("root.tunmesh.cluster.local", 365*day, now)
	if err != nil {
		t.Fatal(err)
	}
	issuer, issuerKey, err := NewIntermediate(root, rootKey, "identity.tunmesh.cluster.local", 180*day, now)
	if err != nil {
		t.Fatal(err)
	}
	anchors := mustAnchors(t, EncodeCertPEM(root))
	iss, err := ParseIssuer(EncodeCertPEM(issuer), mustKeyPEM(t, issuerKey), anchors, now)
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{root, rootKey, issuer, issuerKey, anchors, iss}
}

func (p *testPKI) newCA(t *testing.T, cfg Config) *CA {
	t.Helper()
	c, err := New(cfg, p.iss, p.anchors)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustAnchors(t *testing.T, pemData []byte) *Anchors {
	t.Helper()
	a, err := ParseAnchors(pemData)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func mustKeyPEM(t *testing.T, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	b, err := EncodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func pkcs8PEM(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func p256Key(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// foreignKeys are the keys tunmesh must refuse, generated once (RSA is slow).
var foreignKeys = sync.OnceValue(func() []struct {
	name string
	key  crypto.Signer
} {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		panic(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return []struct {
		name string
		key  crypto.Signer
	}{{"ECDSA P-384", p384}, {"RSA 2048", rsaKey}, {"Ed25519", edKey}}
})

// certOpts describes a certificate made by makeCert, for the shapes the
// helpers in the package under test do not make.
type certOpts struct {
	cn         string
	isCA       bool
	maxPathLen int // -1 unconstrained; only for CAs
	notBefore  time.Time
	notAfter   time.Time
	keyUsage   x509.KeyUsage
	uris       []*url.URL
}

// makeCert signs a certificate for pub with parentKey; parent nil means
// self-signed.
func makeCert(t *testing.T, o certOpts, pub crypto.PublicKey, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	serial, err := randomSerial()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: o.cn},
		NotBefore:             o.notBefore,
		NotAfter:              o.notAfter,
		KeyUsage:              o.keyUsage,
		BasicConstraintsValid: true,
		IsCA:                  o.isCA,
		URIs:                  o.uris,
	}
	if o.isCA {
		tmpl.MaxPathLen = o.maxPathLen
		tmpl.MaxPathLenZero = o.maxPathLen == 0
		if o.keyUsage == 0 {
			tmpl.KeyUsage = x509.KeyUsageCertSign
		}
	}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// csrOpts are the SANs of a test CSR.
type csrOpts struct {
	uris   []*url.URL
	dns    []string
	ips    []net.IP
	emails []string
	cn     string
}

func makeCSR(t testing.TB, key crypto.Signer, o csrOpts) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: o.cn},
		URIs:           o.uris,
		DNSNames:       o.dns,
		IPAddresses:    o.ips,
		EmailAddresses: o.emails,
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func parseCSR(t *testing.T, der []byte) *x509.CertificateRequest {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func parseChain(t *testing.T, ders [][]byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
