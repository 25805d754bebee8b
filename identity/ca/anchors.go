package ca

import (
	"crypto/x509"
	"fmt"
)

// Anchors is the set of trust anchors (root certificates) that every
// tunmesh workload trusts. It holds more than one root while roots rotate:
// workloads trust old and new, then the old one is dropped. Anchors is
// immutable once parsed and safe for concurrent use.
type Anchors struct {
	certs []*x509.Certificate
	pool  *x509.CertPool
	pem   []byte
}

// ParseAnchors parses a PEM bundle of one or more CA certificates with ECDSA
// P-256 keys. Duplicates are dropped. Validity periods are not checked here,
// because whether an anchor is still good depends on when it is used (see
// ParseIssuer and tunmeshctl's checks). Errors wrap ErrInvalidAnchors, and
// ErrUnsupportedAlgorithm for foreign keys.
func ParseAnchors(pemBundle []byte) (*Anchors, error) {
	certs, err := ParseCertificatesPEM(pemBundle)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidAnchors, err)
	}
	a := &Anchors{pool: x509.NewCertPool()}
	seen := make(map[string]bool)
	for i, c := range certs {
		if !c.BasicConstraintsValid || !c.IsCA {
			return nil, fmt.Errorf("%w: certificate %d (%s) is not a CA", ErrInvalidAnchors, i, c.Subject)
		}
		if err := CheckPublicKey(c.PublicKey); err != nil {
			return nil, fmt.Errorf("%w: certificate %d (%s): %w", ErrInvalidAnchors, i, c.Subject, err)
		}
		if seen[string(c.Raw)] {
			continue
		}
		seen[string(c.Raw)] = true
		a.certs = append(a.certs, c)
		a.pool.AddCert(c)
	}
	a.pem = EncodeCertPEM(a.certs...)
	return a, nil
}

// Pool returns a pool of the anchors for x509.VerifyOptions.Roots or
// tls.Config. Each call returns a fresh copy that the caller may change.
func (a *Anchors) Pool() *x509.CertPool { return a.pool.Clone() }

// Certificates returns the anchors in bundle order. The slice is a copy; the
// certificates themselves must not be modified.
func (a *Anchors) Certificates() []*x509.Certificate {
	return append([]*x509.Certificate(nil), a.certs...)
}

// PEM returns the anchors re-encoded as a PEM bundle (comments and
// duplicates of the input are gone), for distribution to workloads.
func (a *Anchors) PEM() []byte { return append([]byte(nil), a.pem...) }

// contains reports whether c is one of the anchors, byte for byte.
func (a *Anchors) contains(c *x509.Certificate) bool {
	for _, x := range a.certs {
		if x.Equal(c) {
			return true
		}
	}
	return false
}
