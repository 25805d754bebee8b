package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// FuzzCheckCSR feeds arbitrary DER and arbitrary namespace and
// ServiceAccount names through CheckCSR. It must never panic, every error
// must carry one of the package's sentinels, and whatever it accepts must
// satisfy the documented rules and sign into a leaf for exactly that
// identity.
func FuzzCheckCSR(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "web"}
	for _, tmpl := range []*x509.CertificateRequest{
		{},
		{URIs: []*url.URL{id.URL()}, DNSNames: []string{id.DNSName("tunmesh")}},
		{DNSNames: []string{"web.shop.svc"}},
	} {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(der, "shop", "web")
	}

	// One CA for the whole run; certificates are checked at a fixed time.
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	root, rootKey, err := NewRoot("root", 365*day, now)
	if err != nil {
		f.Fatal(err)
	}
	issuer, issuerKey, err := NewIntermediate(root, rootKey, "issuer", 180*day, now)
	if err != nil {
		f.Fatal(err)
	}
	anchors, err := ParseAnchors(EncodeCertPEM(root))
	if err != nil {
		f.Fatal(err)
	}
	c, err := New(Config{}, &Issuer{Certificate: issuer, Key: issuerKey}, anchors)
	if err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, der []byte, ns, sa string) {
		id := spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil {
			// Sign must reject what does not parse, as ErrBadCSR.
			if _, err := c.Sign(der, id, now); !errors.Is(err, ErrBadCSR) {
				t.Fatalf("Sign of unparsable CSR: %v, want ErrBadCSR", err)
			}
			return
		}
		err = CheckCSR(csr, id, "tunmesh")
		if err != nil {
			if !errors.Is(err, ErrBadCSR) && !errors.Is(err, ErrUnsupportedAlgorithm) &&
				!errors.Is(err, ErrSANMismatch) && !errors.Is(err, spiffe.ErrInvalidID) {
				t.Fatalf("CheckCSR error without a sentinel: %v", err)
			}
			if _, serr := c.Sign(der, id, now); serr == nil {
				t.Fatalf("Sign accepted what CheckCSR refused (%v)", err)
			}
			return
		}

		// Accepted: the rules hold.
		if err := id.Validate(); err != nil {
			t.Fatalf("accepted invalid id: %v", err)
		}
		if err := CheckPublicKey(csr.PublicKey); err != nil {
			t.Fatalf("accepted key: %v", err)
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("accepted bad signature: %v", err)
		}
		if len(csr.URIs) > 1 || len(csr.URIs) == 1 && csr.URIs[0].String() != id.String() {
			t.Fatalf("accepted URI SANs %v for %s", csr.URIs, id)
		}
		if len(csr.DNSNames) > 1 || len(csr.DNSNames) == 1 && csr.DNSNames[0] != id.DNSName("tunmesh") {
			t.Fatalf("accepted DNS SANs %v for %s", csr.DNSNames, id)
		}
		if len(csr.IPAddresses) != 0 || len(csr.EmailAddresses) != 0 {
			t.Fatalf("accepted IP/email SANs %v %v", csr.IPAddresses, csr.EmailAddresses)
		}

		// And the leaf it signs names exactly id and verifies.
		ders, err := c.Sign(der, id, now)
		if err != nil {
			t.Fatalf("Sign after CheckCSR accepted: %v", err)
		}
		leaf, err := x509.ParseCertificate(ders[0])
		if err != nil {
			t.Fatal(err)
		}
		if got, err := spiffe.FromCertificate(leaf); err != nil || got != id {
			t.Fatalf("leaf identity %+v, %v; want %+v", got, err, id)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: anchors.Pool(), Intermediates: pool(issuer), CurrentTime: now}); err != nil {
			t.Fatalf("leaf does not verify: %v", err)
		}
	})
}
