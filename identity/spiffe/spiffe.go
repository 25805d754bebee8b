// Package spiffe parses and formats the workload identities tunmesh issues:
// SPIFFE IDs of the fixed form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>,
// one per Kubernetes ServiceAccount, plus the Linkerd-style DNS name that
// accompanies them in certificates.
//
// Parsing is deliberately strict. An ID is compared byte for byte when a peer
// is authorized, so there must be exactly one spelling of each identity:
// Parse(s) succeeds only when s == id.String().
package spiffe

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// ErrInvalidID is wrapped by every error about a malformed or unexpected
// SPIFFE ID.
var ErrInvalidID = errors.New("invalid SPIFFE ID")

const (
	scheme = "spiffe://"

	// maxIDLength is the SPIFFE spec's limit on a whole ID in bytes; Parse
	// checks it first so that huge inputs are refused cheaply.
	maxIDLength = 2048
	// maxTrustDomainLength keeps the trust domain usable as a DNS suffix of
	// DNSName; the SPIFFE spec itself only bounds the whole ID.
	maxTrustDomainLength = 255
	maxLabelLength       = 63  // DNS-1123 label (Kubernetes namespace)
	maxSubdomainLength   = 253 // DNS-1123 subdomain (Kubernetes ServiceAccount)
)

// ID is a workload identity: the ServiceAccount Namespace/ServiceAccount in
// TrustDomain.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// Parse parses spiffe://<trust-domain>/ns/<ns>/sa/<sa>. It rejects anything
// but that exact form: other schemes (including upper case), ports, user info,
// queries, fragments, percent-encoding, empty or extra path segments, a
// trust domain outside [a-z0-9._-], a namespace that is not a DNS-1123 label
// or a ServiceAccount that is not a DNS-1123 subdomain. Errors wrap
// ErrInvalidID.
func Parse(s string) (ID, error) {
	id, err := parse(s)
	if err != nil {
		return ID{}, fmt.Errorf("parse SPIFFE ID %q: %w", truncate(s), err)
	}
	return id, nil
}

func parse(s string) (ID, error) {
	if len(s) > maxIDLength {
		return ID{}, invalid("longer than %d bytes", maxIDLength)
	}
	rest, ok := strings.CutPrefix(s, scheme)
	if !ok {
		return ID{}, invalid("scheme must be %q", scheme)
	}
	// Reject URL features by name before the character checks below would
	// reject them anonymously, so the error says what was wrong.
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		if rest[i] == '?' {
			return ID{}, invalid("query not allowed")
		}
		return ID{}, invalid("fragment not allowed")
	}
	td, path, _ := strings.Cut(rest, "/")
	if strings.Contains(td, "@") {
		return ID{}, invalid("user info not allowed")
	}
	if strings.Contains(td, ":") {
		return ID{}, invalid("port not allowed")
	}
	if err := ValidateTrustDomain(td); err != nil {
		return ID{}, err
	}
	// path is now "ns/<ns>/sa/<sa>"; anything else, including a trailing
	// slash or an empty segment, is not ours.
	seg := strings.Split(path, "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return ID{}, invalid("path must be /ns/<namespace>/sa/<service-account>")
	}
	id := ID{TrustDomain: td, Namespace: seg[1], ServiceAccount: seg[3]}
	if err := id.Validate(); err != nil {
		return ID{}, err
	}
	return id, nil
}

// String returns the ID as a URI, the inverse of Parse for valid IDs.
func (id ID) String() string {
	return scheme + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// URL returns the ID as a URL, as placed in a certificate's URI SAN.
func (id ID) URL() *url.URL {
	return &url.URL{
		Scheme: "spiffe",
		Host:   id.TrustDomain,
		Path:   "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount,
	}
}

// Validate reports whether every part of id is well formed, with the rules of
// Parse. Errors wrap ErrInvalidID.
func (id ID) Validate() error {
	if err := ValidateTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	if err := validateDNSLabel(id.Namespace); err != nil {
		return fmt.Errorf("namespace %q: %w", truncate(id.Namespace), err)
	}
	if err := validateDNSSubdomain(id.ServiceAccount); err != nil {
		return fmt.Errorf("service account %q: %w", truncate(id.ServiceAccount), err)
	}
	// With the part limits above an ID stays far below the spec's 2048
	// bytes, so the whole needs no separate check.
	return nil
}

// DNSName returns the Linkerd-style DNS name of the identity,
// <sa>.<ns>.serviceaccount.identity.<controlNamespace>.<trust-domain>, which
// tunmesh puts in leaf certificates next to the SPIFFE ID so that tooling
// built for Linkerd identities understands them.
func (id ID) DNSName(controlNamespace string) string {
	return id.ServiceAccount + "." + id.Namespace + ".serviceaccount.identity." + controlNamespace + "." + id.TrustDomain
}

// ControlPlaneDNSName is the DNS name of a control-plane component's serving
// certificate, <component>.<controlNamespace>.control.<trust-domain>. It is
// outside the workload name space (DNSName always has the labels
// "serviceaccount.identity" before the control namespace), so no workload
// leaf can carry it: an agent that trusts this name trusts the component,
// not whoever holds a certificate for the component's ServiceAccount.
func ControlPlaneDNSName(component, controlNamespace, trustDomain string) string {
	return component + "." + controlNamespace + ".control." + trustDomain
}

// FromCertificate returns the identity in c's single URI SAN. A certificate
// with no URI SAN or several of them is rejected rather than guessed at.
// Errors wrap ErrInvalidID.
func FromCertificate(c *x509.Certificate) (ID, error) {
	if c == nil {
		return ID{}, fmt.Errorf("identity from certificate: %w", invalid("nil certificate"))
	}
	if len(c.URIs) != 1 {
		return ID{}, fmt.Errorf("identity from certificate %q: %w",
			c.Subject.CommonName, invalid("want exactly one URI SAN, found %d", len(c.URIs)))
	}
	id, err := Parse(c.URIs[0].String())
	if err != nil {
		return ID{}, fmt.Errorf("identity from certificate %q: %w", c.Subject.CommonName, err)
	}
	return id, nil
}

// ValidateTrustDomain reports whether td is a SPIFFE trust domain name: not
// empty and made only of lowercase letters, digits, dots, dashes and
// underscores. Errors wrap ErrInvalidID.
func ValidateTrustDomain(td string) error {
	if td == "" {
		return invalid("empty trust domain")
	}
	if len(td) > maxTrustDomainLength {
		return invalid("trust domain longer than %d bytes", maxTrustDomainLength)
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		if !isLowerAlnum(c) && c != '.' && c != '-' && c != '_' {
			return invalid("trust domain %q: character %q not in [a-z0-9._-]", truncate(td), c)
		}
	}
	return nil
}

// validateDNSLabel checks an RFC 1123 label as Kubernetes does for namespace
// names: [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 bytes.
func validateDNSLabel(s string) error {
	if s == "" {
		return invalid("empty DNS-1123 label")
	}
	if len(s) > maxLabelLength {
		return invalid("DNS-1123 label longer than %d bytes", maxLabelLength)
	}
	return checkLabelChars(s)
}

// validateDNSSubdomain checks an RFC 1123 subdomain as Kubernetes does for
// ServiceAccount names: dot-separated labels, at most 253 bytes in all.
// Like Kubernetes it does not bound single labels.
func validateDNSSubdomain(s string) error {
	if s == "" {
		return invalid("empty DNS-1123 subdomain")
	}
	if len(s) > maxSubdomainLength {
		return invalid("DNS-1123 subdomain longer than %d bytes", maxSubdomainLength)
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" {
			return invalid("DNS-1123 subdomain has an empty label")
		}
		if err := checkLabelChars(label); err != nil {
			return err
		}
	}
	return nil
}

func checkLabelChars(s string) error {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !isLowerAlnum(c) && c != '-' {
			return invalid("character %q not in [a-z0-9-]", c)
		}
	}
	if s[0] == '-' || s[len(s)-1] == '-' {
		return invalid("must start and end with [a-z0-9]")
	}
	return nil
}

func isLowerAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidID}, args...)...)
}

// truncate keeps error messages readable when the input is hostile.
func truncate(s string) string {
	const limit = 300
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
