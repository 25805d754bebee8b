package identitycli

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
)

func TestBootstrap(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "out") // created by Bootstrap
	res, err := Bootstrap(BootstrapOptions{Dir: dir, Now: t0})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"ca.crt", "ca.key", "tls.crt", "tls.key", "issuer-secret.yaml"}
	var got []string
	for _, p := range res.Paths {
		if filepath.Dir(p) != dir {
			t.Errorf("wrote %s outside %s", p, dir)
		}
		got = append(got, filepath.Base(p))
	}
	if !slices.Equal(got, want) {
		t.Fatalf("paths %v, want %v", got, want)
	}
	modes := map[string]fs.FileMode{"ca.crt": 0o644, "ca.key": 0o600, "tls.crt": 0o644, "tls.key": 0o600, "issuer-secret.yaml": 0o600}
	for name, mode := range modes {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), mode)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != len(want) {
		t.Errorf("dir holds %d entries, want %d (temporary files left?)", len(entries), len(want))
	}

	// The identity service can load it, and it signs verifiable leaves.
	iss, anchors, err := ca.LoadFiles(dir, t0)
	if err != nil {
		t.Fatalf("LoadFiles: %v", err)
	}
	if err := iss.Verify(anchors, t0.Add(179*day)); err != nil {
		t.Errorf("issuer does not verify: %v", err)
	}
	if !iss.Certificate.Equal(res.Issuer) || !anchors.Certificates()[0].Equal(res.Anchor) {
		t.Error("Result certificates differ from the files")
	}
	h := &hierarchy{root: res.Anchor, anchors: anchors, issuer: iss}
	chain := h.leaf(t, "shop", "web", t0.Add(time.Hour))
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: anchors.Pool(), Intermediates: pool(chain[1:]), CurrentTime: t0.Add(time.Hour)}); err != nil {
		t.Errorf("leaf from bootstrapped issuer does not verify: %v", err)
	}

	// Names and validity.
	if res.Anchor.Subject.CommonName != "root.tunmesh.cluster.local" || res.Issuer.Subject.CommonName != "identity.tunmesh.cluster.local" {
		t.Errorf("names %q, %q", res.Anchor.Subject.CommonName, res.Issuer.Subject.CommonName)
	}
	if !res.Anchor.NotAfter.Equal(t0.Add(365*day)) || !res.Issuer.NotAfter.Equal(t0.Add(180*day)) {
		t.Errorf("validity: anchor until %s, issuer until %s", res.Anchor.NotAfter, res.Issuer.NotAfter)
	}
	if !res.Issuer.MaxPathLenZero || !res.Anchor.IsCA {
		t.Error("issuer may sign CAs or anchor is no CA")
	}

	// The anchor key belongs to the anchor.
	anchorKeyPEM, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	anchorKey, err := ca.ParseKeyPEM(anchorKeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if !anchorKey.PublicKey.Equal(res.Anchor.PublicKey) {
		t.Error("ca.key does not match ca.crt")
	}

	// The Secret carries the same three files.
	secret := readFile(t, filepath.Join(dir, "issuer-secret.yaml"))
	fields := parseSecret(t, secret)
	for k, v := range map[string]string{
		"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
		"metadata.name": "tunmesh-identity-issuer", "metadata.namespace": "tunmesh",
	} {
		if fields[k] != v {
			t.Errorf("secret %s = %q, want %q", k, fields[k], v)
		}
	}
	for _, name := range []string{"ca.crt", "tls.crt", "tls.key"} {
		data, err := base64.StdEncoding.DecodeString(fields["data."+name])
		if err != nil {
			t.Fatalf("secret data %s: %v", name, err)
		}
		if !bytes.Equal(data, readFile(t, filepath.Join(dir, name))) {
			t.Errorf("secret data %s differs from the file", name)
		}
	}
}

func TestBootstrapOptions(t *testing.T) {
	dir := t.TempDir()
	res, err := Bootstrap(BootstrapOptions{
		Dir: dir, TrustDomain: "example.org", Now: t0,
		AnchorValidity: 30 * day, IssuerValidity: 7 * day,
		SecretNamespace: "mesh-system", SecretName: "issuer",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Anchor.Subject.CommonName != "root.mesh-system.example.org" || !res.Issuer.NotAfter.Equal(t0.Add(7*day)) {
		t.Errorf("anchor %q, issuer until %s", res.Anchor.Subject.CommonName, res.Issuer.NotAfter)
	}
	fields := parseSecret(t, readFile(t, filepath.Join(dir, "issuer-secret.yaml")))
	if fields["metadata.name"] != "issuer" || fields["metadata.namespace"] != "mesh-system" {
		t.Errorf("secret %s/%s", fields["metadata.namespace"], fields["metadata.name"])
	}

	bad := []struct {
		name string
		o    BootstrapOptions
		want string
	}{
		{"no dir", BootstrapOptions{}, "no output directory"},
		{"bad trust domain", BootstrapOptions{Dir: t.TempDir(), TrustDomain: "Example.org"}, "trust domain"},
		{"bad namespace", BootstrapOptions{Dir: t.TempDir(), SecretNamespace: "a.b"}, "secret namespace/name"},
		{"bad name", BootstrapOptions{Dir: t.TempDir(), SecretName: "Issuer"}, "secret namespace/name"},
		{"issuer outlives anchor", BootstrapOptions{Dir: t.TempDir(), AnchorValidity: day, IssuerValidity: 2 * day}, "exceeds anchor validity"},
		{"negative", BootstrapOptions{Dir: t.TempDir(), AnchorValidity: -day}, "negative validity"},
	}
	for _, tt := range bad {
		if _, err := Bootstrap(tt.o); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Bootstrap = %v, want error containing %q", tt.name, err, tt.want)
		}
		if tt.o.Dir != "" {
			if entries, _ := os.ReadDir(tt.o.Dir); len(entries) != 0 {
				t.Errorf("%s: wrote files despite the error", tt.name)
			}
		}
	}
}

func TestBootstrapRefusesOverwrite(t *testing.T) {
	dir := t.TempDir()
	if _, err := Bootstrap(BootstrapOptions{Dir: dir, Now: t0}); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, dir)

	_, err := Bootstrap(BootstrapOptions{Dir: dir, Now: t0})
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second Bootstrap = %v, want fs.ErrExist", err)
	}
	if !strings.Contains(err.Error(), "ca.crt, ca.key, tls.crt, tls.key, issuer-secret.yaml") {
		t.Errorf("error %q does not list the files", err)
	}
	if !maps.Equal(before, snapshot(t, dir)) {
		t.Error("refused Bootstrap changed the files")
	}

	// One stray file is enough to refuse, and nothing else gets written.
	dir2 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir2, "tls.key"), []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Bootstrap(BootstrapOptions{Dir: dir2, Now: t0}); !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "tls.key") {
		t.Fatalf("Bootstrap = %v, want fs.ErrExist naming tls.key", err)
	}
	if entries, _ := os.ReadDir(dir2); len(entries) != 1 {
		t.Errorf("dir holds %d entries, want only the stray file", len(entries))
	}

	// Force replaces the files, and fixes the mode of a key file that
	// was world-readable.
	if _, err := Bootstrap(BootstrapOptions{Dir: dir2, Now: t0, Force: true}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir2, "tls.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("forced tls.key: %v, %v; want mode 0600", fi.Mode(), err)
	}
	if _, err := Bootstrap(BootstrapOptions{Dir: dir, Now: t0, Force: true}); err != nil {
		t.Fatal(err)
	}
	after := snapshot(t, dir)
	if after["ca.crt"] == before["ca.crt"] || after["tls.key"] == before["tls.key"] {
		t.Error("forced Bootstrap kept the old anchor or key")
	}
	if _, _, err := ca.LoadFiles(dir, t0); err != nil {
		t.Errorf("LoadFiles after Force: %v", err)
	}
}

func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range entries {
		m[e.Name()] = string(readFile(t, filepath.Join(dir, e.Name())))
	}
	return m
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// parseSecret reads the two-level YAML Bootstrap writes into
// "key" / "parent.key" fields; enough to check it without a YAML library.
func parseSecret(t *testing.T, b []byte) map[string]string {
	t.Helper()
	fields := map[string]string{}
	parent := ""
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		indented := strings.HasPrefix(line, "  ")
		if strings.HasPrefix(line, "    ") {
			continue // labels
		}
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			t.Fatalf("bad YAML line %q", line)
		}
		v = strings.TrimSpace(v)
		if !indented {
			parent = k
			if v != "" {
				fields[k] = v
			}
			continue
		}
		fields[parent+"."+k] = v
	}
	return fields
}

func pool(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}
