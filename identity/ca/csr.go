package ca

import (
	"crypto/x509"
	"fmt"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// CheckCSR checks that csr may be signed for id: id is well formed, the key
// is ECDSA P-256 (ErrUnsupportedAlgorithm), the CSR is signed by that key
// (ErrBadCSR), and it names no one else (ErrSANMismatch): URI SANs are
// absent or exactly [id], DNS SANs absent or exactly
// [id.DNSName(controlNamespace)], and there are no IP or email SANs.
//
// The CSR's subject and requested extensions are ignored: Sign builds the
// leaf from id alone, so nothing else the requester asks for reaches it.
// CheckCSR is pure so that the rules can be tested on their own.
func CheckCSR(csr *x509.CertificateRequest, id spiffe.ID, controlNamespace string) error {
	if csr == nil {
		return fmt.Errorf("check CSR: %w: nil CSR", ErrBadCSR)
	}
	if err := id.Validate(); err != nil {
		return fmt.Errorf("check CSR: %w", err)
	}
	// The algorithm first: it is the more useful error for an RSA CSR,
	// and CheckSignature has nothing to say about keys it cannot handle.
	if err := CheckPublicKey(csr.PublicKey); err != nil {
		return fmt.Errorf("check CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("check CSR: %w: %w", ErrBadCSR, err)
	}
	want := id.String()
	switch len(csr.URIs) {
	case 0:
	case 1:
		if got := csr.URIs[0].String(); got != want {
			return fmt.Errorf("check CSR: %w: URI SAN %q, want %q", ErrSANMismatch, got, want)
		}
	default:
		return fmt.Errorf("check CSR: %w: %d URI SANs %q, want at most %q", ErrSANMismatch, len(csr.URIs), csr.URIs, want)
	}
	wantDNS := id.DNSName(controlNamespace)
	switch len(csr.DNSNames) {
	case 0:
	case 1:
		if got := csr.DNSNames[0]; got != wantDNS {
			return fmt.Errorf("check CSR: %w: DNS SAN %q, want %q", ErrSANMismatch, got, wantDNS)
		}
	default:
		return fmt.Errorf("check CSR: %w: %d DNS SANs %q, want at most %q", ErrSANMismatch, len(csr.DNSNames), csr.DNSNames, wantDNS)
	}
	if len(csr.IPAddresses) > 0 {
		return fmt.Errorf("check CSR: %w: IP SAN %s not allowed", ErrSANMismatch, csr.IPAddresses[0])
	}
	if len(csr.EmailAddresses) > 0 {
		return fmt.Errorf("check CSR: %w: email SAN %q not allowed", ErrSANMismatch, csr.EmailAddresses[0])
	}
	return nil
}
