// Package ca is the certificate authority at the core of tunmesh identity,
// modelled on Linkerd's: a trust anchor (root) signs an issuer
// (intermediate, kept in a cert-manager style Secret), and the issuer signs
// a short-lived leaf certificate per ServiceAccount. A leaf carries the
// workload's SPIFFE ID as its only URI SAN and the Linkerd-style DNS name
// as its only DNS SAN.
//
// Every key in the hierarchy is ECDSA P-256; anything else is rejected with
// ErrUnsupportedAlgorithm. The package does no I/O besides LoadFiles and
// knows nothing of Kubernetes: who may ask for which identity is decided by
// the caller before Sign.
package ca

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// Sentinel errors; branch on them with errors.Is.
var (
	// ErrUnsupportedAlgorithm: a key (anchor, issuer, intermediate or CSR)
	// is not ECDSA P-256.
	ErrUnsupportedAlgorithm = errors.New("unsupported key algorithm")
	// ErrInvalidAnchors: the trust anchor bundle cannot be used.
	ErrInvalidAnchors = errors.New("invalid trust anchors")
	// ErrInvalidIssuer: the issuer cannot be used to sign (also returned
	// by Sign when the issuer has expired since it was loaded).
	ErrInvalidIssuer = errors.New("invalid issuer")
	// ErrBadCSR: the CSR does not parse or its signature is wrong.
	ErrBadCSR = errors.New("bad certificate signing request")
	// ErrSANMismatch: the CSR asks for names other than the identity's.
	ErrSANMismatch = errors.New("CSR subject alternative names do not match identity")
	// ErrTrustDomainMismatch: the identity is outside this CA's trust domain.
	ErrTrustDomainMismatch = errors.New("identity not in the CA's trust domain")
)

// Config defaults.
const (
	DefaultTrustDomain      = "cluster.local"
	DefaultControlNamespace = "tunmesh"
	DefaultLifetime         = 24 * time.Hour
	DefaultClockSkew        = 20 * time.Second
)

// Config tunes the leaves a CA signs. Zero fields take the defaults above.
type Config struct {
	// TrustDomain is the only trust domain the CA signs identities in.
	TrustDomain string
	// ControlNamespace is the namespace tunmesh runs in; it is part of each
	// leaf's DNS name.
	ControlNamespace string
	// Lifetime is how long a leaf is valid from the time it is signed (it
	// is cut short when the issuer expires first).
	Lifetime time.Duration
	// ClockSkew back-dates a leaf's NotBefore so that peers whose clocks
	// run a little behind accept it at once.
	ClockSkew time.Duration
}

func (c Config) withDefaults() Config {
	if c.TrustDomain == "" {
		c.TrustDomain = DefaultTrustDomain
	}
	if c.ControlNamespace == "" {
		c.ControlNamespace = DefaultControlNamespace
	}
	if c.Lifetime == 0 {
		c.Lifetime = DefaultLifetime
	}
	if c.ClockSkew == 0 {
		c.ClockSkew = DefaultClockSkew
	}
	return c
}

func (c Config) validate() error {
	if err := spiffe.ValidateTrustDomain(c.TrustDomain); err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	// A namespace is a DNS label; borrow the SPIFFE ID rules, which check
	// exactly that for the ID's namespace.
	probe := spiffe.ID{TrustDomain: c.TrustDomain, Namespace: c.ControlNamespace, ServiceAccount: "x"}
	if err := probe.Validate(); err != nil {
		return fmt.Errorf("control namespace: %w", err)
	}
	if c.Lifetime < 0 {
		return fmt.Errorf("negative lifetime %s", c.Lifetime)
	}
	if c.ClockSkew < 0 {
		return fmt.Errorf("negative clock skew %s", c.ClockSkew)
	}
	return nil
}

// CA signs workload certificates. It is safe for concurrent use; the issuer
// can be swapped at any time (SetIssuer) without disturbing signings in
// flight, each of which uses one issuer throughout.
type CA struct {
	cfg     Config
	anchors *Anchors
	issuer  atomic.Pointer[Issuer]
}

// New returns a CA signing with issuer. cfg's zero fields take defaults.
// The issuer is expected to come from ParseIssuer or LoadFiles, which check
// it against anchors; New does not check it again.
func New(cfg Config, issuer *Issuer, anchors *Anchors) (*CA, error) {
	if issuer == nil || issuer.Certificate == nil || issuer.Key == nil {
		return nil, errors.New("new CA: nil issuer")
	}
	if anchors == nil {
		return nil, errors.New("new CA: nil anchors")
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("new CA: config: %w", err)
	}
	c := &CA{cfg: cfg, anchors: anchors}
	c.issuer.Store(issuer)
	return c, nil
}

// SetIssuer replaces the issuer, for rotation. Signings already under way
// finish with the old one. A nil issuer is a programming error and panics,
// rather than surfacing later as a nil dereference inside Sign.
func (c *CA) SetIssuer(iss *Issuer) {
	if iss == nil || iss.Certificate == nil || iss.Key == nil {
		panic("ca: SetIssuer with nil issuer")
	}
	c.issuer.Store(iss)
}

// Issuer returns the current issuer.
func (c *CA) Issuer() *Issuer { return c.issuer.Load() }

// Anchors returns the trust anchors given to New.
func (c *CA) Anchors() *Anchors { return c.anchors }

// Config returns the configuration with defaults filled in.
func (c *CA) Config() Config { return c.cfg }

// Sign signs a leaf certificate for id from a DER-encoded CSR and returns
// the DER chain [leaf, issuer, intermediates...]. The caller has already
// decided that the requester may hold id; Sign checks that the CSR asks for
// nothing else (see CheckCSR) and that id is in the CA's trust domain.
func (c *CA) Sign(csrDER []byte, id spiffe.ID, now time.Time) ([][]byte, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w: %w", id, ErrBadCSR, err)
	}
	if id.TrustDomain != c.cfg.TrustDomain {
		return nil, fmt.Errorf("sign %s: %w: CA trust domain is %q", id, ErrTrustDomainMismatch, c.cfg.TrustDomain)
	}
	if err := CheckCSR(csr, id, c.cfg.ControlNamespace); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}

	iss := c.issuer.Load()
	if err := checkValidity("issuer certificate", iss.Certificate, now); err != nil {
		return nil, fmt.Errorf("sign %s: %w: %w", id, ErrInvalidIssuer, err)
	}
	notBefore := now.Add(-c.cfg.ClockSkew)
	notAfter := now.Add(c.cfg.Lifetime)
	if limit := iss.notAfter(); notAfter.After(limit) {
		notAfter = limit
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	dnsName := id.DNSName(c.cfg.ControlNamespace)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: dnsName},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              []string{dnsName},
		// AuthorityKeyId: crypto/x509 copies the issuer's SubjectKeyId.
	}
	leaf, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Certificate, csr.PublicKey, iss.Key)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	chain := make([][]byte, 0, 2+len(iss.Chain))
	chain = append(chain, leaf, iss.Certificate.Raw)
	for _, ic := range iss.Chain {
		chain = append(chain, ic.Raw)
	}
	return chain, nil
}

// SignServer signs a server-only leaf for a control-plane component from a
// DER-encoded CSR: its single DNS SAN is dnsName (from
// spiffe.ControlPlaneDNSName), it has no SPIFFE URI (it is not a workload
// identity) and can only authenticate a server. The CSR's own names are
// ignored. Validity follows the same rules as Sign.
func (c *CA) SignServer(csrDER []byte, dnsName string, now time.Time) ([][]byte, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("sign server %s: %w: %w", dnsName, ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign server %s: %w: %w", dnsName, ErrBadCSR, err)
	}
	if !strings.HasSuffix(dnsName, ".control."+c.cfg.TrustDomain) {
		return nil, fmt.Errorf("sign server %s: %w: not a control-plane name of %q", dnsName, ErrSANMismatch, c.cfg.TrustDomain)
	}
	iss := c.issuer.Load()
	if err := checkValidity("issuer certificate", iss.Certificate, now); err != nil {
		return nil, fmt.Errorf("sign server %s: %w: %w", dnsName, ErrInvalidIssuer, err)
	}
	notAfter := now.Add(c.cfg.Lifetime)
	if limit := iss.notAfter(); notAfter.After(limit) {
		notAfter = limit
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("sign server %s: %w", dnsName, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: dnsName},
		NotBefore:             now.Add(-c.cfg.ClockSkew),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{dnsName},
	}
	leaf, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Certificate, csr.PublicKey, iss.Key)
	if err != nil {
		return nil, fmt.Errorf("sign server %s: %w", dnsName, err)
	}
	chain := make([][]byte, 0, 2+len(iss.Chain))
	chain = append(chain, leaf, iss.Certificate.Raw)
	for _, ic := range iss.Chain {
		chain = append(chain, ic.Raw)
	}
	return chain, nil
}

// randomSerial returns a random, positive, non-zero 128-bit serial number.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("generate serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}
