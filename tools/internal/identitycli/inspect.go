package identitycli

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
)

// ErrNoCertificates is returned by Inspect for input without certificates.
var ErrNoCertificates = errors.New("no certificates found")

// Inspect writes a human-readable summary of every certificate in pemData,
// in order, then whether the first certificate verifies against the others
// at now (all of them serve as possible anchors and intermediates, so a
// leaf + issuer + root file and a bare leaf + issuer both work). PEM blocks
// that are not certificates (a key in a combined file, say) are skipped.
// A failed verification is reported, not returned: errors are for input
// that cannot be read.
func Inspect(w io.Writer, pemData []byte, now time.Time) error {
	var certs []*x509.Certificate
	rest := pemData
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return fmt.Errorf("inspect: certificate %d: %w", len(certs), err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return fmt.Errorf("inspect: %w", ErrNoCertificates)
	}

	p := &printer{w: w}
	for i, c := range certs {
		if i > 0 {
			p.printf("\n")
		}
		describe(p, i, c, now)
	}
	p.printf("\n")
	describeChain(p, certs, now)
	if p.err != nil {
		return fmt.Errorf("inspect: %w", p.err)
	}
	return nil
}

func describe(p *printer, i int, c *x509.Certificate, now time.Time) {
	p.printf("Certificate %d\n", i)
	p.field("Subject", nameOrEmpty(c.Subject.String()))
	p.field("Issuer", nameOrEmpty(c.Issuer.String()))
	p.field("Serial", serialHex(c))
	p.field("Key", ca.KeyAlgorithm(c.PublicKey))
	p.field("CA", caDescription(c))
	if len(c.URIs) > 0 {
		uris := make([]string, len(c.URIs))
		for i, u := range c.URIs {
			uris[i] = u.String()
		}
		p.field("URI SANs", strings.Join(uris, ", "))
	}
	if len(c.DNSNames) > 0 {
		p.field("DNS SANs", strings.Join(c.DNSNames, ", "))
	}
	if len(c.IPAddresses) > 0 {
		ips := make([]string, len(c.IPAddresses))
		for i, ip := range c.IPAddresses {
			ips[i] = ip.String()
		}
		p.field("IP SANs", strings.Join(ips, ", "))
	}
	if len(c.EmailAddresses) > 0 {
		p.field("Email SANs", strings.Join(c.EmailAddresses, ", "))
	}
	p.field("Not before", c.NotBefore.UTC().Format(time.RFC3339))
	p.field("Not after", c.NotAfter.UTC().Format(time.RFC3339)+" ("+validityNote(c, now)+")")
}

func describeChain(p *printer, certs []*x509.Certificate, now time.Time) {
	leaf := certs[0]
	if len(certs) == 1 {
		if isSelfSigned(leaf) {
			p.printf("Chain: single self-signed certificate, signature OK\n")
		} else {
			p.printf("Chain: single certificate, nothing to verify it against\n")
		}
		return
	}
	// Self-signed certificates among the others are the anchors: when a
	// root is present the chain must reach it, or a file with the wrong
	// root would pass by stopping at the issuer. Without one, whatever is
	// there stands in for the anchors.
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	haveRoot := false
	for _, c := range certs[1:] {
		if isSelfSigned(c) {
			roots.AddCert(c)
			haveRoot = true
		} else {
			inter.AddCert(c)
		}
	}
	if !haveRoot {
		roots = inter
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		p.printf("Chain: FAILED: certificate 0 does not verify against the other %d: %v\n", len(certs)-1, err)
		return
	}
	names := make([]string, len(chains[0]))
	for i, c := range chains[0] {
		names[i] = nameOrEmpty(c.Subject.String())
	}
	p.printf("Chain: OK: %s\n", strings.Join(names, " -> "))
}

func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

func caDescription(c *x509.Certificate) string {
	switch {
	case !c.IsCA:
		return "no"
	case c.MaxPathLen > 0 || c.MaxPathLen == 0 && c.MaxPathLenZero:
		return fmt.Sprintf("yes, max path length %d", c.MaxPathLen)
	default:
		return "yes, path length unconstrained"
	}
}

func validityNote(c *x509.Certificate, now time.Time) string {
	switch {
	case now.Before(c.NotBefore):
		return "NOT YET VALID, starts in " + humanDuration(c.NotBefore.Sub(now))
	case now.After(c.NotAfter):
		return "EXPIRED " + humanDuration(now.Sub(c.NotAfter)) + " ago"
	default:
		return "expires in " + humanDuration(c.NotAfter.Sub(now))
	}
}

// humanDuration rounds d to the two largest units that matter when
// reading an expiry date: "179d23h", "23h59m", "4m10s".
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	const day = 24 * time.Hour
	switch {
	case d >= day:
		d = d.Truncate(time.Hour)
		return fmt.Sprintf("%dd%dh", d/day, (d%day)/time.Hour)
	case d >= time.Hour:
		d = d.Truncate(time.Minute)
		return fmt.Sprintf("%dh%dm", d/time.Hour, (d%time.Hour)/time.Minute)
	default:
		return d.Truncate(time.Second).String()
	}
}

func serialHex(c *x509.Certificate) string {
	if c.SerialNumber == nil {
		return "(none)"
	}
	b := c.SerialNumber.Bytes()
	if len(b) == 0 {
		return "00"
	}
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	s := strings.Join(parts, ":")
	if c.SerialNumber.Sign() < 0 {
		s = "-" + s
	}
	return s
}

func nameOrEmpty(s string) string {
	if s == "" {
		return "(empty)"
	}
	return s
}

// printer keeps the first write error so that the callers can write
// freely and check once.
type printer struct {
	w   io.Writer
	err error
}

func (p *printer) printf(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, args...)
	}
}

func (p *printer) field(name, value string) {
	p.printf("  %-11s %s\n", name+":", value)
}
