package identitycli

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/workload"
)

var checkNames = []string{
	"trust anchors use supported algorithm (ECDSA P-256)",
	"trust anchors are within their validity period",
	"trust anchors are valid for at least 60 days",
	"issuer certificate uses supported algorithm",
	"issuer certificate is within its validity period",
	"issuer certificate is valid for at least 60 days",
	"issuer certificate is issued by the trust anchor",
}

func TestCheckAnchorsAndIssuer(t *testing.T) {
	healthy := newHierarchy(t, 365*day, 180*day)
	shortAnchor := newHierarchy(t, 30*day, 20*day)
	other := newHierarchy(t, 365*day, 180*day)

	// Rotation: the anchor bundle holds the old root (expiring soon) and
	// a new one.
	oldRoot, _, err := ca.NewRoot("old-root", 40*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	twoRoots, err := ca.ParseAnchors(ca.EncodeCertPEM(oldRoot, healthy.root))
	if err != nil {
		t.Fatal(err)
	}

	// A P-384 issuer can only be built by hand: package ca refuses it.
	p384Key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384Tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "p384-issuer"},
		NotBefore: t0, NotAfter: t0.Add(180 * day), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}
	p384DER, err := x509.CreateCertificate(rand.Reader, p384Tmpl, healthy.root, &p384Key.PublicKey, healthy.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	p384Cert, err := x509.ParseCertificate(p384DER)
	if err != nil {
		t.Fatal(err)
	}

	type failure struct{ check, hint string }
	tests := []struct {
		name    string
		anchors *ca.Anchors
		issuer  *ca.Issuer
		now     time.Time
		min     time.Duration
		fails   []failure
	}{
		{name: "healthy", anchors: healthy.anchors, issuer: healthy.issuer, now: t0.Add(day)},
		{name: "healthy, default minimum", anchors: healthy.anchors, issuer: healthy.issuer, now: t0.Add(day), min: 0},
		{
			name: "anchor expires within 60 days", anchors: shortAnchor.anchors, issuer: shortAnchor.issuer, now: t0.Add(day),
			fails: []failure{
				{checkNames[2], "trust anchor CN=root.tunmesh.cluster.local expires at 2026-03-31T12:00:00Z (in 29d0h)"},
				{checkNames[5], "issuer certificate CN=identity.tunmesh.cluster.local expires at 2026-03-21T12:00:00Z (in 19d0h)"},
			},
		},
		{
			name: "old anchor of a rotation expires soon", anchors: twoRoots, issuer: healthy.issuer, now: t0.Add(day),
			fails: []failure{{checkNames[2], "trust anchor CN=old-root expires at 2026-04-10T12:00:00Z"}},
		},
		{
			name: "issuer signed by another root", anchors: healthy.anchors, issuer: other.issuer, now: t0.Add(day),
			fails: []failure{{checkNames[6], "issuer certificate CN=identity.tunmesh.cluster.local: issuer not signed by any trust anchor: x509: certificate signed by unknown authority"}},
		},
		{
			name: "issuer expired", anchors: healthy.anchors, issuer: healthy.issuer, now: t0.Add(200 * day),
			fails: []failure{
				{checkNames[4], "issuer certificate CN=identity.tunmesh.cluster.local expired at 2026-08-28T12:00:00Z"},
				{checkNames[5], "(20d0h ago)"},
				{checkNames[6], "expired"},
			},
		},
		{
			name: "everything expired", anchors: healthy.anchors, issuer: healthy.issuer, now: t0.Add(400 * day),
			fails: []failure{
				{checkNames[1], "trust anchor CN=root.tunmesh.cluster.local expired at 2027-03-01T12:00:00Z"},
				{checkNames[2], ""}, {checkNames[4], ""}, {checkNames[5], ""}, {checkNames[6], ""},
			},
		},
		{
			name: "P-384 issuer", anchors: healthy.anchors, issuer: &ca.Issuer{Certificate: p384Cert}, now: t0.Add(day),
			fails: []failure{{checkNames[3], "issuer certificate CN=p384-issuer uses ECDSA P-384; tunmesh supports ECDSA P-256 only"}},
		},
		{
			name: "shorter minimum", anchors: shortAnchor.anchors, issuer: shortAnchor.issuer, now: t0.Add(day), min: 7 * day,
		},
		{
			name: "nothing loaded",
			fails: []failure{
				{checkNames[0], "no trust anchors loaded"}, {checkNames[1], ""}, {checkNames[2], ""},
				{checkNames[3], "no issuer loaded"}, {checkNames[4], ""}, {checkNames[5], ""}, {checkNames[6], ""},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			minValidity := tt.min
			if minValidity == 0 && tt.name != "healthy, default minimum" {
				minValidity = 60 * day
			}
			checks := CheckAnchorsAndIssuer(tt.anchors, tt.issuer, tt.now, minValidity)
			names := checkNames
			if tt.min == 7*day {
				names = append([]string(nil), checkNames...)
				names[2] = "trust anchors are valid for at least 7 days"
				names[5] = "issuer certificate is valid for at least 7 days"
			}
			if len(checks) != len(names) {
				t.Fatalf("%d checks, want %d: %+v", len(checks), len(names), checks)
			}
			failed := map[string]Check{}
			for i, c := range checks {
				if c.Name != names[i] {
					t.Errorf("check %d is %q, want %q", i, c.Name, names[i])
				}
				if !c.OK {
					failed[c.Name] = c
				}
				if c.OK && c.Hint != "" {
					t.Errorf("passed check %q has hint %q", c.Name, c.Hint)
				}
			}
			for _, f := range tt.fails {
				c, ok := failed[f.check]
				if !ok {
					t.Errorf("check %q passed, want failure", f.check)
					continue
				}
				if !strings.Contains(c.Hint, f.hint) || c.Hint == "" {
					t.Errorf("check %q hint %q does not contain %q", f.check, c.Hint, f.hint)
				}
				delete(failed, f.check)
			}
			for name, c := range failed {
				t.Errorf("unexpected failure %q: %s", name, c.Hint)
			}
		})
	}
}

func TestCheckAgentLeaves(t *testing.T) {
	ok := func(agent, node string, n int) AgentReport {
		return AgentReport{Agent: agent, Node: node, VerifyReport: workload.VerifyReport{Certificates: n}}
	}
	stale := AgentReport{Agent: "tunmesh-node-b", Node: "node-2", VerifyReport: workload.VerifyReport{
		Certificates: 3, Failed: 2, Errors: []string{"x509: certificate signed by unknown authority"}}}
	for _, tt := range []struct {
		name    string
		reports []AgentReport
		ok      bool
		title   string
		hint    string
	}{
		{name: "all current", reports: []AgentReport{ok("tunmesh-node-a", "node-1", 1), ok("tunmesh-node-b", "node-2", 1)}, ok: true,
			title: "workload certificates chain to the current trust anchors (2 certificates from 2 agents)"},
		{name: "agents without workloads", reports: []AgentReport{ok("tunmesh-node-a", "node-1", 0)}, ok: true,
			title: "(0 certificates from 1 agents)"},
		{name: "leaves from the old anchor", reports: []AgentReport{ok("tunmesh-node-a", "node-1", 2), stale},
			title: "(5 certificates from 2 agents)",
			hint:  "2 of 3 certificates of agent tunmesh-node-b on node-2 do not chain to the current trust anchors: x509: certificate signed by unknown authority"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := CheckAgentLeaves(tt.reports)
			if c.OK != tt.ok || !strings.Contains(c.Name, tt.title) || !strings.HasPrefix(c.Name, LeavesCheckName) ||
				!strings.Contains(c.Hint, tt.hint) || (!c.OK && c.Hint == "") {
				t.Errorf("CheckAgentLeaves = %+v, want ok=%v, name containing %q, hint containing %q", c, tt.ok, tt.title, tt.hint)
			}
		})
	}
}

func TestPrintChecks(t *testing.T) {
	var out bytes.Buffer
	ok := PrintChecks(&out, []Check{
		{Name: "first", OK: true},
		{Name: "second", Hint: "fix it"},
		{Name: "third", OK: true},
	})
	want := "√ first\n× second\n    see: fix it\n√ third\n"
	if ok || out.String() != want {
		t.Errorf("PrintChecks = %v,\n%q\nwant false,\n%q", ok, out.String(), want)
	}
	out.Reset()
	if !PrintChecks(&out, []Check{{Name: "a", OK: true}}) || out.String() != "√ a\n" {
		t.Errorf("all passing: %q", out.String())
	}
	if !PrintChecks(&out, nil) {
		t.Error("no checks should be ok")
	}
}
