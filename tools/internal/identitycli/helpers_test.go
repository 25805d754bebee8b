package identitycli

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const day = 24 * time.Hour

// hierarchy is a root and an issuer under it, loaded as the identity
// service would.
type hierarchy struct {
	root    *x509.Certificate
	rootKey *ecdsa.PrivateKey
	anchors *ca.Anchors
	issuer  *ca.Issuer
}

func newHierarchy(t *testing.T, rootValidity, issuerValidity time.Duration) *hierarchy {
	t.Helper()
	root, rootKey, err := ca.NewRoot("root.tunmesh.cluster.local", rootValidity, t0)
	if err != nil {
		t.Fatal(err)
	}
	return issuerUnder(t, root, rootKey, issuerValidity)
}

func issuerUnder(t *testing.T, root *x509.Certificate, rootKey *ecdsa.PrivateKey, validity time.Duration) *hierarchy {
	t.Helper()
	cert, key, err := ca.NewIntermediate(root, rootKey, "identity.tunmesh.cluster.local", validity, t0)
	if err != nil {
		t.Fatal(err)
	}
	anchors, err := ca.ParseAnchors(ca.EncodeCertPEM(root))
	if err != nil {
		t.Fatal(err)
	}
	return &hierarchy{root: root, rootKey: rootKey, anchors: anchors,
		issuer: &ca.Issuer{Certificate: cert, Key: key}}
}

// leaf signs a workload certificate for ns/sa at now and returns the chain.
func (h *hierarchy) leaf(t *testing.T, ns, sa string, now time.Time) []*x509.Certificate {
	t.Helper()
	c, err := ca.New(ca.Config{}, h.issuer, h.anchors)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	ders, err := c.Sign(csr, spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}, now)
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for _, d := range ders {
		cert, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	return chain
}
