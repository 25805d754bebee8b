package ca

import (
	"crypto"
	"crypto/x509"
	"errors"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

func TestNew(t *testing.T) {
	p := newTestPKI(t, t0)
	c := p.newCA(t, Config{})
	want := Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh", Lifetime: 24 * time.Hour, ClockSkew: 20 * time.Second}
	if c.Config() != want {
		t.Errorf("defaults %+v, want %+v", c.Config(), want)
	}
	if c.Issuer() != p.iss || c.Anchors() != p.anchors {
		t.Error("accessors return other objects")
	}

	bad := []struct {
		name    string
		cfg     Config
		iss     *Issuer
		anchors *Anchors
		wantErr string
	}{
		{"nil issuer", Config{}, nil, p.anchors, "nil issuer"},
		{"issuer without key", Config{}, &Issuer{Certificate: p.issuer}, p.anchors, "nil issuer"},
		{"nil anchors", Config{}, p.iss, nil, "nil anchors"},
		{"upper-case trust domain", Config{TrustDomain: "Cluster.local"}, p.iss, p.anchors, "trust domain"},
		{"bad control namespace", Config{ControlNamespace: "tun.mesh"}, p.iss, p.anchors, "control namespace"},
		{"negative lifetime", Config{Lifetime: -time.Hour}, p.iss, p.anchors, "negative lifetime"},
		{"negative skew", Config{ClockSkew: -time.Second}, p.iss, p.anchors, "negative clock skew"},
	}
	for _, tt := range bad {
		if _, err := New(tt.cfg, tt.iss, tt.anchors); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%s: New = %v, want error containing %q", tt.name, err, tt.wantErr)
		}
	}
}

func TestSignLeafFields(t *testing.T) {
	p := newTestPKI(t, t0)
	exampleID := spiffe.ID{TrustDomain: "example.org", Namespace: "shop", ServiceAccount: "web.v2"}
	tests := []struct {
		name          string
		cfg           Config
		id            spiffe.ID
		csr           csrOpts
		wantDNS       string
		wantNotBefore time.Time
		wantNotAfter  time.Time
	}{
		{
			name: "defaults, empty CSR", id: testID,
			wantDNS:       "web.shop.serviceaccount.identity.tunmesh.cluster.local",
			wantNotBefore: t0.Add(time.Hour - 20*time.Second), wantNotAfter: t0.Add(25 * time.Hour),
		},
		{
			name: "defaults, CSR with both SANs", id: testID,
			csr:           csrOpts{uris: []*url.URL{testID.URL()}, dns: []string{testID.DNSName("tunmesh")}, cn: "ignored"},
			wantDNS:       "web.shop.serviceaccount.identity.tunmesh.cluster.local",
			wantNotBefore: t0.Add(time.Hour - 20*time.Second), wantNotAfter: t0.Add(25 * time.Hour),
		},
		{
			name: "custom config", id: exampleID,
			cfg:           Config{TrustDomain: "example.org", ControlNamespace: "mesh", Lifetime: 2 * time.Hour, ClockSkew: 5 * time.Second},
			wantDNS:       "web.v2.shop.serviceaccount.identity.mesh.example.org",
			wantNotBefore: t0.Add(time.Hour - 5*time.Second), wantNotAfter: t0.Add(3 * time.Hour),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := p.newCA(t, tt.cfg)
			key := p256Key(t)
			now := t0.Add(time.Hour)
			ders, err := c.Sign(makeCSR(t, key, tt.csr), tt.id, now)
			if err != nil {
				t.Fatal(err)
			}
			chain := parseChain(t, ders)
			if len(chain) != 2 || !chain[1].Equal(p.issuer) {
				t.Fatalf("chain has %d certificates, want [leaf, issuer]", len(chain))
			}
			leaf := chain[0]
			checkLeaf(t, leaf, key.Public(), tt.id, tt.wantDNS, tt.wantNotBefore, tt.wantNotAfter, p.issuer)
			if _, err := leaf.Verify(x509.VerifyOptions{
				Roots: p.anchors.Pool(), Intermediates: pool(chain[1:]...), CurrentTime: now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			}); err != nil {
				t.Errorf("leaf does not verify as a client: %v", err)
			}
		})
	}
}

// checkLeaf asserts every field Sign promises.
func checkLeaf(t *testing.T, leaf *x509.Certificate, pub any, id spiffe.ID, dns string, notBefore, notAfter time.Time, issuer *x509.Certificate) {
	t.Helper()
	if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %s is not a positive 128-bit number", leaf.SerialNumber)
	}
	if leaf.Subject.String() != "CN="+dns {
		t.Errorf("subject %q, want CN=%s", leaf.Subject, dns)
	}
	if leaf.Issuer.String() != issuer.Subject.String() {
		t.Errorf("issuer %q, want %q", leaf.Issuer, issuer.Subject)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs %v, want [%s]", leaf.URIs, id)
	}
	if !slices.Equal(leaf.DNSNames, []string{dns}) {
		t.Errorf("DNS SANs %v, want [%s]", leaf.DNSNames, dns)
	}
	if len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("unexpected SANs %v %v", leaf.IPAddresses, leaf.EmailAddresses)
	}
	if got, err := spiffe.FromCertificate(leaf); err != nil || got != id {
		t.Errorf("FromCertificate = %+v, %v", got, err)
	}
	if !leaf.NotBefore.Equal(notBefore) || !leaf.NotAfter.Equal(notAfter) {
		t.Errorf("validity %s..%s, want %s..%s", leaf.NotBefore, leaf.NotAfter, notBefore, notAfter)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %b, want digitalSignature only", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ext key usage %v, want [serverAuth clientAuth]", leaf.ExtKeyUsage)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("basic constraints valid=%v CA=%v, want valid non-CA", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	if len(issuer.SubjectKeyId) == 0 || string(leaf.AuthorityKeyId) != string(issuer.SubjectKeyId) {
		t.Errorf("authority key id %x, want issuer's subject key id %x", leaf.AuthorityKeyId, issuer.SubjectKeyId)
	}
	if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(leaf.PublicKey) {
		t.Error("leaf key is not the CSR's key")
	}
	if err := leaf.CheckSignatureFrom(issuer); err != nil {
		t.Errorf("leaf not signed by issuer: %v", err)
	}
}

func pool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func TestSignSerialsDiffer(t *testing.T) {
	p := newTestPKI(t, t0)
	c := p.newCA(t, Config{})
	seen := map[string]bool{}
	csr := makeCSR(t, p256Key(t), csrOpts{})
	for range 20 {
		ders, err := c.Sign(csr, testID, t0)
		if err != nil {
			t.Fatal(err)
		}
		s := parseChain(t, ders)[0].SerialNumber.String()
		if seen[s] {
			t.Fatalf("serial %s issued twice", s)
		}
		seen[s] = true
	}
}

func TestSignClampsToIssuerExpiry(t *testing.T) {
	root, rootKey, err := NewRoot("root", 365*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	anchors := mustAnchors(t, EncodeCertPEM(root))
	issuer, issuerKey, err := NewIntermediate(root, rootKey, "short-issuer", 10*time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ParseIssuer(EncodeCertPEM(issuer), mustKeyPEM(t, issuerKey), anchors, t0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Config{}, iss, anchors)
	if err != nil {
		t.Fatal(err)
	}

	// An intermediate above the issuer that expires even sooner.
	midKey := p256Key(t)
	mid := makeCert(t, certOpts{cn: "mid", isCA: true, maxPathLen: -1, notBefore: t0, notAfter: t0.Add(5 * time.Hour)}, &midKey.PublicKey, root, rootKey)
	issuer2, issuer2Key, err := NewIntermediate(mid, midKey, "issuer2", 100*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	iss2, err := ParseIssuer(cat(EncodeCertPEM(issuer2), EncodeCertPEM(mid)), mustKeyPEM(t, issuer2Key), anchors, t0)
	if err != nil {
		t.Fatal(err)
	}

	csr := makeCSR(t, p256Key(t), csrOpts{})
	tests := []struct {
		name         string
		iss          *Issuer
		now          time.Time
		wantNotAfter time.Time
		wantChain    int
	}{
		{"issuer outlived by a fresh leaf", iss, t0, issuer.NotAfter, 2}, // 24h > 10h
		{"clamped to issuer", iss, t0.Add(time.Hour), issuer.NotAfter, 2},
		{"last second", iss, issuer.NotAfter, issuer.NotAfter, 2},
		{"clamped to intermediate", iss2, t0.Add(time.Hour), mid.NotAfter, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c.SetIssuer(tt.iss)
			ders, err := c.Sign(csr, testID, tt.now)
			if err != nil {
				t.Fatal(err)
			}
			chain := parseChain(t, ders)
			if len(chain) != tt.wantChain {
				t.Fatalf("chain length %d, want %d", len(chain), tt.wantChain)
			}
			if got := chain[0].NotAfter; !got.Equal(tt.wantNotAfter) {
				t.Errorf("NotAfter %s, want %s", got, tt.wantNotAfter)
			}
			if got, want := chain[0].NotBefore, tt.now.Add(-20*time.Second); !got.Equal(want) {
				t.Errorf("NotBefore %s, want %s", got, want)
			}
			if _, err := chain[0].Verify(x509.VerifyOptions{Roots: anchors.Pool(), Intermediates: pool(chain[1:]...), CurrentTime: tt.now}); err != nil {
				t.Errorf("leaf does not verify: %v", err)
			}
		})
	}
}

func TestSignErrors(t *testing.T) {
	p := newTestPKI(t, t0)
	c := p.newCA(t, Config{})
	good := makeCSR(t, p256Key(t), csrOpts{})
	tests := []struct {
		name    string
		csr     []byte
		id      spiffe.ID
		now     time.Time
		wantErr error
		wantMsg string
	}{
		{name: "garbage DER", csr: []byte("junk"), id: testID, now: t0, wantErr: ErrBadCSR},
		{name: "empty DER", csr: nil, id: testID, now: t0, wantErr: ErrBadCSR},
		{name: "other trust domain", csr: good, id: spiffe.ID{TrustDomain: "evil.org", Namespace: "shop", ServiceAccount: "web"}, now: t0,
			wantErr: ErrTrustDomainMismatch, wantMsg: `CA trust domain is "cluster.local"`},
		{name: "invalid id", csr: good, id: spiffe.ID{TrustDomain: "cluster.local", Namespace: "a/b", ServiceAccount: "web"}, now: t0, wantErr: spiffe.ErrInvalidID},
		{name: "SAN mismatch", csr: makeCSR(t, p256Key(t), csrOpts{dns: []string{"x"}}), id: testID, now: t0, wantErr: ErrSANMismatch},
		{name: "RSA key", csr: makeCSR(t, foreignKeys()[1].key, csrOpts{}), id: testID, now: t0, wantErr: ErrUnsupportedAlgorithm, wantMsg: "RSA 2048"},
		{name: "issuer expired since load", csr: good, id: testID, now: p.issuer.NotAfter.Add(time.Second), wantErr: ErrInvalidIssuer, wantMsg: "expired at"},
		{name: "issuer not yet valid", csr: good, id: testID, now: t0.Add(-time.Minute), wantErr: ErrInvalidIssuer, wantMsg: "not valid before"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ders, err := c.Sign(tt.csr, tt.id, tt.now)
			if !errors.Is(err, tt.wantErr) || ders != nil {
				t.Fatalf("Sign = %d certs, %v; want %v", len(ders), err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantMsg)
			}
		})
	}
}

// TestSetIssuerConcurrent rotates the issuer while signing; every chain
// must be consistent (its leaf signed by the issuer it carries). Run with
// -race.
func TestSetIssuerConcurrent(t *testing.T) {
	p := newTestPKI(t, t0)
	c := p.newCA(t, Config{})
	other, otherKey, err := NewIntermediate(p.root, p.rootKey, "issuer-2", 180*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	iss2, err := ParseIssuer(EncodeCertPEM(other), mustKeyPEM(t, otherKey), p.anchors, t0)
	if err != nil {
		t.Fatal(err)
	}
	csr := makeCSR(t, p256Key(t), csrOpts{})

	// One rotator swaps issuers until the signers are done.
	var rotator, signers sync.WaitGroup
	stop := make(chan struct{})
	rotator.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				c.SetIssuer(iss2)
			} else {
				c.SetIssuer(p.iss)
			}
		}
	})
	errs := make(chan error, 8)
	for range 8 {
		signers.Go(func() {
			for range 25 {
				if err := signAndCheck(c, csr); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	signers.Wait()
	close(stop)
	rotator.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	defer func() {
		if recover() == nil {
			t.Error("SetIssuer(nil) did not panic")
		}
	}()
	c.SetIssuer(nil)
}

// signAndCheck signs csr and checks that the leaf is signed by the issuer
// in the same chain.
func signAndCheck(c *CA, csr []byte) error {
	ders, err := c.Sign(csr, testID, t0)
	if err != nil {
		return err
	}
	chain := make([]*x509.Certificate, len(ders))
	for i, d := range ders {
		if chain[i], err = x509.ParseCertificate(d); err != nil {
			return err
		}
	}
	return chain[0].CheckSignatureFrom(chain[1])
}

// TestOpenSSL has openssl, an independent implementation, read and verify
// a signed chain. It uses the real clock, because openssl verify does.
func TestOpenSSL(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not on PATH")
	}
	now := time.Now().Truncate(time.Second)
	p := newTestPKI(t, now.Add(-time.Hour))
	c := p.newCA(t, Config{})
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "web"}
	ders, err := c.Sign(makeCSR(t, p256Key(t), csrOpts{}), id, now)
	if err != nil {
		t.Fatal(err)
	}
	chain := parseChain(t, ders)
	dir := t.TempDir()
	files := map[string][]byte{
		"anchor.pem": EncodeCertPEM(p.root),
		"issuer.pem": EncodeCertPEM(chain[1]),
		"leaf.pem":   EncodeCertPEM(chain[0]),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(openssl, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	for _, purpose := range []string{"", "sslclient", "sslserver"} {
		args := []string{"verify", "-CAfile", "anchor.pem", "-untrusted", "issuer.pem"}
		if purpose != "" {
			args = append(args, "-purpose", purpose)
		}
		if out := run(append(args, "leaf.pem")...); strings.TrimSpace(out) != "leaf.pem: OK" {
			t.Errorf("openssl verify (purpose %q): %s", purpose, out)
		}
	}
	text := run("x509", "-in", "leaf.pem", "-noout", "-text")
	for _, want := range []string{
		"Subject: CN = web.shop.serviceaccount.identity.tunmesh.cluster.local",
		"URI:spiffe://cluster.local/ns/shop/sa/web",
		"DNS:web.shop.serviceaccount.identity.tunmesh.cluster.local",
		"CA:FALSE",
		"Digital Signature",
		"TLS Web Server Authentication, TLS Web Client Authentication",
		"X509v3 Authority Key Identifier",
		"ASN1 OID: prime256v1",
		"Signature Algorithm: ecdsa-with-SHA256",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("openssl x509 -text lacks %q:\n%s", want, text)
		}
	}
	// The SAN line holds exactly the two names.
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, "URI:") && strings.Count(line, ",") != 1 {
			t.Errorf("SAN line %q has other names", strings.TrimSpace(line))
		}
	}
	// A leaf from a stranger root does not verify against our anchor.
	strangerRoot, _, err := NewRoot("stranger", day, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stranger.pem"), EncodeCertPEM(strangerRoot), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(openssl, "verify", "-CAfile", "stranger.pem", "-untrusted", "issuer.pem", "leaf.pem")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("openssl verified against a stranger root: %s", out)
	}
}

// TestSignServer: the control plane's serving leaf has only its DNS name,
// no SPIFFE ID (it is no workload identity) and server auth only; names
// outside the control-plane space are refused.
func TestSignServer(t *testing.T) {
	p := newTestPKI(t, t0)
	c := p.newCA(t, Config{})
	now := t0.Add(time.Hour)
	name := spiffe.ControlPlaneDNSName("tunmesh-identity", "tunmesh", "cluster.local")
	ders, err := c.SignServer(makeCSR(t, p256Key(t), csrOpts{uris: []*url.URL{testID.URL()}}), name, now)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(ders[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != name || len(leaf.URIs) != 0 {
		t.Errorf("SANs dns %v uris %v, want only %s", leaf.DNSNames, leaf.URIs, name)
	}
	if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
		t.Errorf("ext key usage %v, want server auth only", leaf.ExtKeyUsage)
	}
	if _, err := c.SignServer(makeCSR(t, p256Key(t), csrOpts{}), testID.DNSName("tunmesh"), now); !errors.Is(err, ErrSANMismatch) {
		t.Errorf("workload name as server name: err %v, want ErrSANMismatch", err)
	}
}
