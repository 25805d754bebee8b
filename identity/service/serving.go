package service

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// servingCert is the service's own TLS certificate: a server-only leaf
// from the current issuer whose DNS SAN is
// <sa>.<control-ns>.control.<trust-domain> (spiffe.ControlPlaneDNSName),
// a name outside the workload name space, so that no workload certificate
// can pass for the identity service (clients verify that name against the
// trust anchors). It is re-issued when the issuer changes or at 70% of its
// lifetime.
type servingCert struct {
	svc *Service

	mu      sync.Mutex // guards the fields below
	cert    *tls.Certificate
	issuer  []byte // Raw of the issuer that signed cert
	renewAt time.Time
}

// ServerName is the name clients must verify in the service's certificate.
func (s *Service) ServerName() string {
	c := s.ca.Config()
	return spiffe.ControlPlaneDNSName(s.cfg.ServiceAccount, c.ControlNamespace, c.TrustDomain)
}

func (sc *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	now := sc.svc.now()
	iss := sc.svc.ca.Issuer()
	if sc.cert != nil && now.Before(sc.renewAt) && string(sc.issuer) == string(iss.Certificate.Raw) {
		return sc.cert, nil
	}
	cert, err := sc.issue(now)
	if err != nil {
		if sc.cert != nil {
			return sc.cert, nil // keep serving the old one
		}
		return nil, err
	}
	sc.cert, sc.issuer = cert, iss.Certificate.Raw
	return cert, nil
}

func (sc *servingCert) issue(now time.Time) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("serving key: %w", err)
	}
	name := sc.svc.ServerName()
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("serving csr: %w", err)
	}
	chain, err := sc.svc.ca.SignServer(csrDER, name, now)
	if err != nil {
		return nil, fmt.Errorf("sign serving certificate %s: %w", name, err)
	}
	leaf, err := parseLeaf(chain)
	if err != nil {
		return nil, err
	}
	sc.renewAt = leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 7 / 10)
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

func parseLeaf(chain [][]byte) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("empty chain")
	}
	return x509.ParseCertificate(chain[0])
}

func firstCertDER(certPEM []byte) ([]byte, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, errors.New("no certificate PEM block")
	}
	return b.Bytes, nil
}
