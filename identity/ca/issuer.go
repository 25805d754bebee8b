package ca

import (
	"crypto/ecdsa"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// File names of the cert-manager Secret layout, as mounted into the
// identity service.
const (
	CertFile    = "tls.crt" // issuer certificate, then any intermediates above it
	KeyFile     = "tls.key" // issuer private key
	AnchorsFile = "ca.crt"  // trust anchors
)

// Issuer is the intermediate CA that signs workload certificates.
type Issuer struct {
	Certificate *x509.Certificate
	Key         *ecdsa.PrivateKey
	// Chain holds the intermediates between Certificate and the trust
	// anchors, nearest first, excluding the anchors themselves. It is sent
	// to workloads after the issuer so that peers can build the path.
	Chain []*x509.Certificate
}

// ParseIssuer parses and checks an issuer: certPEM holds the issuer
// certificate followed by any intermediates, keyPEM its private key (SEC 1
// or PKCS #8). The issuer must be an ECDSA P-256 CA, hold the key that
// matches the certificate, be valid at now and chain to anchors. Errors wrap
// ErrInvalidIssuer, and ErrUnsupportedAlgorithm for foreign keys.
func ParseIssuer(certPEM, keyPEM []byte, anchors *Anchors, now time.Time) (*Issuer, error) {
	if anchors == nil {
		return nil, fmt.Errorf("%w: no trust anchors to check against", ErrInvalidIssuer)
	}
	certs, err := ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate: %w", ErrInvalidIssuer, err)
	}
	cert := certs[0]
	var chain []*x509.Certificate
	for _, c := range certs[1:] {
		// cert-manager puts the root into tls.crt for some issuers; an
		// anchor belongs in ca.crt only, or workloads would send it along.
		if !anchors.contains(c) {
			chain = append(chain, c)
		}
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidIssuer, err)
	}
	iss := &Issuer{Certificate: cert, Key: key, Chain: chain}
	if err := iss.check(anchors, now); err != nil {
		return nil, err
	}
	return iss, nil
}

// check runs the checks of ParseIssuer on an assembled issuer.
func (iss *Issuer) check(anchors *Anchors, now time.Time) error {
	cert := iss.Certificate
	if err := CheckPublicKey(cert.PublicKey); err != nil {
		return fmt.Errorf("%w: issuer certificate %s: %w", ErrInvalidIssuer, cert.Subject, err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return fmt.Errorf("%w: issuer certificate %s is not a CA", ErrInvalidIssuer, cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return fmt.Errorf("%w: issuer certificate %s lacks the certificate-signing key usage", ErrInvalidIssuer, cert.Subject)
	}
	if !iss.Key.PublicKey.Equal(cert.PublicKey) {
		return fmt.Errorf("%w: private key does not match certificate %s", ErrInvalidIssuer, cert.Subject)
	}
	for _, c := range iss.Chain {
		if err := CheckPublicKey(c.PublicKey); err != nil {
			return fmt.Errorf("%w: intermediate %s: %w", ErrInvalidIssuer, c.Subject, err)
		}
	}
	if err := checkValidity("issuer certificate", cert, now); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidIssuer, err)
	}
	if err := iss.Verify(anchors, now); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidIssuer, err)
	}
	return nil
}

// Verify reports whether the issuer, with its Chain, chains to one of the
// anchors at time now.
func (iss *Issuer) Verify(anchors *Anchors, now time.Time) error {
	inter := x509.NewCertPool()
	for _, c := range iss.Chain {
		inter.AddCert(c)
	}
	_, err := iss.Certificate.Verify(x509.VerifyOptions{
		Roots:         anchors.pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("issuer not signed by any trust anchor: %w", err)
	}
	return nil
}

// notAfter is the latest time a certificate signed by iss can be useful:
// past it, some certificate the peer needs to build the path has expired.
func (iss *Issuer) notAfter() time.Time {
	t := iss.Certificate.NotAfter
	for _, c := range iss.Chain {
		if c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

func checkValidity(what string, c *x509.Certificate, now time.Time) error {
	if now.Before(c.NotBefore) {
		return fmt.Errorf("%s %s not valid before %s", what, c.Subject, c.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(c.NotAfter) {
		return fmt.Errorf("%s %s expired at %s", what, c.Subject, c.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// LoadFiles reads an issuer and its trust anchors from dir in cert-manager's
// Secret layout (tls.crt, tls.key, ca.crt) and checks them as ParseIssuer
// does.
func LoadFiles(dir string, now time.Time) (*Issuer, *Anchors, error) {
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("load issuer %q: %w", dir, err)
		}
		return b, nil
	}
	anchorsPEM, err := read(AnchorsFile)
	if err != nil {
		return nil, nil, err
	}
	certPEM, err := read(CertFile)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := read(KeyFile)
	if err != nil {
		return nil, nil, err
	}
	anchors, err := ParseAnchors(anchorsPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("load issuer %q: %s: %w", dir, AnchorsFile, err)
	}
	iss, err := ParseIssuer(certPEM, keyPEM, anchors, now)
	if err != nil {
		return nil, nil, fmt.Errorf("load issuer %q: %w", dir, err)
	}
	return iss, anchors, nil
}
