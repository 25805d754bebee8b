package identitycli

import (
	"crypto/x509"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/workload"
)

// DefaultMinValidity is how long anchors and issuer must stay valid for
// the checks to pass, leaving time to rotate them calmly.
const DefaultMinValidity = 60 * 24 * time.Hour

// Check is the outcome of one check, in the style of `linkerd check`.
type Check struct {
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	// Hint says what is wrong and, where possible, what to do; empty when
	// OK.
	Hint string `json:"hint,omitempty"`
}

// CheckAnchorsAndIssuer checks the trust anchors and the issuer as of now:
// algorithms, validity, at least minValidity left (zero means
// DefaultMinValidity) and that the issuer chains to the anchors. It returns
// every check, passed or not, in a fixed order. With nil anchors or issuer
// the checks that need them fail.
func CheckAnchorsAndIssuer(anchors *ca.Anchors, issuer *ca.Issuer, now time.Time, minValidity time.Duration) []Check {
	if minValidity <= 0 {
		minValidity = DefaultMinValidity
	}
	atLeast := "valid for at least " + durationName(minValidity)
	var checks []Check

	var roots []*x509.Certificate
	if anchors != nil {
		roots = anchors.Certificates()
	}
	eachAnchor := func(name string, test func(c *x509.Certificate) string) {
		if anchors == nil || len(roots) == 0 {
			checks = append(checks, Check{Name: name, Hint: "no trust anchors loaded"})
			return
		}
		for _, c := range roots {
			if hint := test(c); hint != "" {
				checks = append(checks, Check{Name: name, Hint: hint})
				return
			}
		}
		checks = append(checks, Check{Name: name, OK: true})
	}
	eachAnchor("trust anchors use supported algorithm (ECDSA P-256)", func(c *x509.Certificate) string {
		return algorithmHint("trust anchor", c)
	})
	eachAnchor("trust anchors are within their validity period", func(c *x509.Certificate) string {
		return validityHint("trust anchor", c, now)
	})
	eachAnchor("trust anchors are "+atLeast, func(c *x509.Certificate) string {
		return remainingHint("trust anchor", c, now, minValidity, "add a new root to the anchor bundle and re-issue the issuer under it")
	})

	onIssuer := func(name string, test func(iss *ca.Issuer) string) {
		if issuer == nil || issuer.Certificate == nil {
			checks = append(checks, Check{Name: name, Hint: "no issuer loaded"})
			return
		}
		hint := test(issuer)
		checks = append(checks, Check{Name: name, OK: hint == "", Hint: hint})
	}
	onIssuer("issuer certificate uses supported algorithm", func(iss *ca.Issuer) string {
		return algorithmHint("issuer certificate", iss.Certificate)
	})
	onIssuer("issuer certificate is within its validity period", func(iss *ca.Issuer) string {
		return validityHint("issuer certificate", iss.Certificate, now)
	})
	onIssuer("issuer certificate is "+atLeast, func(iss *ca.Issuer) string {
		return remainingHint("issuer certificate", iss.Certificate, now, minValidity, "renew the issuer (cert-manager renews it before expiry if configured)")
	})
	onIssuer("issuer certificate is issued by the trust anchor", func(iss *ca.Issuer) string {
		if anchors == nil {
			return "no trust anchors loaded"
		}
		if err := iss.Verify(anchors, now); err != nil {
			return fmt.Sprintf("issuer certificate %s: %v", iss.Certificate.Subject, err)
		}
		return ""
	})
	return checks
}

// AgentReport is one agent's answer to "do your workload certificates
// chain to these anchors?" (workload.VerifyPath).
type AgentReport struct {
	Agent, Node string
	workload.VerifyReport
}

// LeavesCheckName names the check of the agents' workload certificates.
const LeavesCheckName = "workload certificates chain to the current trust anchors"

// CheckAgentLeaves checks that every agent's workload certificates verify
// against the current anchors. After a root rotation this says whether
// every workload has picked up a certificate from the new root. The agents
// verify their own leaves against the anchors check sends them and report
// counts only (their admin port names no identity), so a hint names the
// agent and node, not the workload.
func CheckAgentLeaves(reports []AgentReport) Check {
	c := Check{Name: fmt.Sprintf("%s (%d certificates from %d agents)", LeavesCheckName, totalCertificates(reports), len(reports))}
	var hints []string
	for _, r := range reports {
		if r.Failed > 0 {
			hints = append(hints, fmt.Sprintf("%d of %d certificates of agent %s on %s do not chain to the current trust anchors: %s",
				r.Failed, r.Certificates, r.Agent, r.Node, strings.Join(r.Errors, "; ")))
		}
	}
	if len(hints) > 0 {
		c.Hint = strings.Join(hints, "; ")
		return c
	}
	c.OK = true
	return c
}

func totalCertificates(reports []AgentReport) int {
	n := 0
	for _, r := range reports {
		n += r.Certificates
	}
	return n
}

// PrintChecks writes one line per check, "√ name" or "× name" followed by
// an indented "see: hint" line, and reports whether all passed.
func PrintChecks(w io.Writer, checks []Check) (ok bool) {
	ok = true
	for _, c := range checks {
		if c.OK {
			fmt.Fprintf(w, "√ %s\n", c.Name)
			continue
		}
		ok = false
		fmt.Fprintf(w, "× %s\n", c.Name)
		if c.Hint != "" {
			fmt.Fprintf(w, "    see: %s\n", c.Hint)
		}
	}
	return ok
}

func algorithmHint(what string, c *x509.Certificate) string {
	if err := ca.CheckPublicKey(c.PublicKey); err != nil {
		return fmt.Sprintf("%s %s uses %s; tunmesh supports ECDSA P-256 only", what, c.Subject, ca.KeyAlgorithm(c.PublicKey))
	}
	return ""
}

func validityHint(what string, c *x509.Certificate, now time.Time) string {
	switch {
	case now.Before(c.NotBefore):
		return fmt.Sprintf("%s %s is not valid before %s", what, c.Subject, stamp(c.NotBefore))
	case now.After(c.NotAfter):
		return fmt.Sprintf("%s %s expired at %s", what, c.Subject, stamp(c.NotAfter))
	}
	return ""
}

func remainingHint(what string, c *x509.Certificate, now time.Time, minLeft time.Duration, todo string) string {
	left := c.NotAfter.Sub(now)
	if left >= minLeft {
		return ""
	}
	when := "in " + humanDuration(left)
	if left < 0 {
		when = humanDuration(left) + " ago"
	}
	return fmt.Sprintf("%s %s expires at %s (%s); %s", what, c.Subject, stamp(c.NotAfter), when, todo)
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// durationName prints whole days as "60 days" and anything else as Go does.
func durationName(d time.Duration) string {
	const day = 24 * time.Hour
	switch {
	case d == day:
		return "1 day"
	case d%day == 0:
		return fmt.Sprintf("%d days", d/day)
	default:
		return d.String()
	}
}
