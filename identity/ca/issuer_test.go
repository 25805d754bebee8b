package ca

import (
	"crypto/ecdsa"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseIssuer(t *testing.T) {
	p := newTestPKI(t, t0)
	rootPEM := EncodeCertPEM(p.root)
	issuerPEM := EncodeCertPEM(p.issuer)
	keyPEM := mustKeyPEM(t, p.issuerKey)

	otherRoot, otherRootKey, err := NewRoot("other-root", 365*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	strangerIssuer, strangerKey, err := NewIntermediate(otherRoot, otherRootKey, "stranger", 180*day, t0)
	if err != nil {
		t.Fatal(err)
	}

	// root -> mid (may sign CAs) -> issuer2: a chain with an intermediate.
	midKey := p256Key(t)
	mid := makeCert(t, certOpts{cn: "mid", isCA: true, maxPathLen: -1, notBefore: t0, notAfter: t0.Add(300 * day)}, &midKey.PublicKey, p.root, p.rootKey)
	issuer2, issuer2Key, err := NewIntermediate(mid, midKey, "issuer-under-mid", 100*day, t0)
	if err != nil {
		t.Fatal(err)
	}

	// Rotation: anchors hold the old and the new root; an issuer under the
	// new root is accepted.
	newRoot, newRootKey, err := NewRoot("new-root", 365*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	rotated, rotatedKey, err := NewIntermediate(newRoot, newRootKey, "rotated-issuer", 180*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	bothRoots := mustAnchors(t, cat(rootPEM, EncodeCertPEM(newRoot)))

	leafKey := p256Key(t)
	leafAsIssuer := makeCert(t, certOpts{cn: "leaf", notBefore: t0, notAfter: t0.Add(day)}, &leafKey.PublicKey, p.issuer, p.issuerKey)
	noCertSignKey := p256Key(t)
	noCertSign := makeCert(t, certOpts{cn: "no-certsign", isCA: true, maxPathLen: 0, keyUsage: 0x1 /* digitalSignature */, notBefore: t0, notAfter: t0.Add(day)}, &noCertSignKey.PublicKey, p.root, p.rootKey)

	ecParams := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})

	type tc struct {
		name      string
		cert, key []byte
		anchors   *Anchors
		now       time.Time
		wantChain []string // CNs of Issuer.Chain
		wantErr   string
		wantAlgo  bool
	}
	tests := []tc{
		{name: "ok", cert: issuerPEM, key: keyPEM},
		{name: "PKCS8 key", cert: issuerPEM, key: pkcs8PEM(t, p.issuerKey)},
		{name: "openssl ecparam key", cert: issuerPEM, key: cat(ecParams, keyPEM)},
		{name: "anchor in tls.crt dropped", cert: cat(issuerPEM, rootPEM), key: keyPEM},
		{name: "with intermediate", cert: cat(EncodeCertPEM(issuer2), EncodeCertPEM(mid)), key: mustKeyPEM(t, issuer2Key), wantChain: []string{"mid"}},
		{name: "with intermediate and anchor", cert: cat(EncodeCertPEM(issuer2), EncodeCertPEM(mid), rootPEM), key: mustKeyPEM(t, issuer2Key), wantChain: []string{"mid"}},
		{name: "rotation: issuer under second root", cert: EncodeCertPEM(rotated), key: mustKeyPEM(t, rotatedKey), anchors: bothRoots},
		{name: "rotation: issuer under first root", cert: issuerPEM, key: keyPEM, anchors: bothRoots},
		{name: "last second of validity", cert: issuerPEM, key: keyPEM, now: p.issuer.NotAfter},

		{name: "expired", cert: issuerPEM, key: keyPEM, now: p.issuer.NotAfter.Add(time.Second),
			wantErr: "issuer certificate CN=identity.tunmesh.cluster.local expired at 2026-08-28T12:00:00Z"},
		{name: "not yet valid", cert: issuerPEM, key: keyPEM, now: t0.Add(-time.Second), wantErr: "not valid before 2026-03-01T12:00:00Z"},
		{name: "mismatched key", cert: issuerPEM, key: mustKeyPEM(t, p256Key(t)), wantErr: "private key does not match certificate"},
		{name: "signed by another root", cert: EncodeCertPEM(strangerIssuer), key: mustKeyPEM(t, strangerKey), wantErr: "issuer not signed by any trust anchor: x509: certificate signed by unknown authority"},
		{name: "intermediate missing", cert: EncodeCertPEM(issuer2), key: mustKeyPEM(t, issuer2Key), wantErr: "issuer not signed by any trust anchor"},
		{name: "not a CA", cert: EncodeCertPEM(leafAsIssuer), key: mustKeyPEM(t, leafKey), wantErr: "is not a CA"},
		{name: "no cert-sign usage", cert: EncodeCertPEM(noCertSign), key: mustKeyPEM(t, noCertSignKey), wantErr: "lacks the certificate-signing key usage"},
		{name: "empty cert", cert: nil, key: keyPEM, wantErr: "no certificate"},
		{name: "garbage cert", cert: []byte("garbage"), key: keyPEM, wantErr: "no certificate"},
		{name: "empty key", cert: issuerPEM, key: nil, wantErr: "no private key"},
		{name: "garbage key", cert: issuerPEM, key: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("junk")}), wantErr: "parse key: EC PRIVATE KEY"},
		{name: "encrypted key", cert: issuerPEM, key: pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte("x")}), wantErr: "encrypted"},
		{name: "nil anchors", cert: issuerPEM, key: keyPEM, anchors: (*Anchors)(nil), wantErr: "no trust anchors"},
	}
	for _, fk := range foreignKeys() {
		// A foreign issuer with its own key: the key file is refused.
		fc := makeCert(t, certOpts{cn: "foreign", isCA: true, maxPathLen: 0, notBefore: t0, notAfter: t0.Add(day)}, fk.key.Public(), p.root, p.rootKey)
		tests = append(tests, tc{name: fk.name + " issuer", cert: EncodeCertPEM(fc), key: pkcs8PEM(t, fk.key),
			wantErr: fk.name + ", want ECDSA P-256", wantAlgo: true})
		// A foreign issuer certificate next to a P-256 key: the
		// certificate is refused before the key comparison.
		tests = append(tests, tc{name: fk.name + " issuer certificate", cert: EncodeCertPEM(fc), key: keyPEM,
			wantErr: "issuer certificate CN=foreign: unsupported key algorithm: " + fk.name, wantAlgo: true})
		// A foreign intermediate above a P-256 issuer.
		fmid := makeCert(t, certOpts{cn: "foreign-mid", isCA: true, maxPathLen: -1, notBefore: t0, notAfter: t0.Add(day)}, fk.key.Public(), p.root, p.rootKey)
		under := makeCert(t, certOpts{cn: "under-foreign", isCA: true, maxPathLen: 0, notBefore: t0, notAfter: t0.Add(day)}, &p.issuerKey.PublicKey, fmid, fk.key)
		tests = append(tests, tc{name: fk.name + " intermediate", cert: cat(EncodeCertPEM(under), EncodeCertPEM(fmid)), key: keyPEM,
			wantErr: "intermediate CN=foreign-mid: unsupported key algorithm", wantAlgo: true})
	}
	// The P-384 key in the legacy SEC 1 form too.
	p384 := foreignKeys()[0].key.(*ecdsa.PrivateKey)
	p384PEM, err := EncodeKeyPEM(p384)
	if err != nil {
		t.Fatal(err)
	}
	tests = append(tests, tc{name: "P-384 SEC 1 key", cert: issuerPEM, key: p384PEM, wantErr: "ECDSA P-384, want ECDSA P-256", wantAlgo: true})

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			anchors := p.anchors
			if tt.anchors != nil || strings.HasPrefix(tt.name, "nil anchors") {
				anchors = tt.anchors
			}
			now := t0.Add(time.Hour)
			if !tt.now.IsZero() {
				now = tt.now
			}
			iss, err := ParseIssuer(tt.cert, tt.key, anchors, now)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseIssuer succeeded, want error containing %q", tt.wantErr)
				}
				if !errors.Is(err, ErrInvalidIssuer) {
					t.Errorf("error %v does not wrap ErrInvalidIssuer", err)
				}
				if tt.wantAlgo != errors.Is(err, ErrUnsupportedAlgorithm) {
					t.Errorf("error %v: wraps ErrUnsupportedAlgorithm = %v, want %v", err, !tt.wantAlgo, tt.wantAlgo)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q\ndoes not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !iss.Key.PublicKey.Equal(iss.Certificate.PublicKey) {
				t.Error("key does not match certificate")
			}
			var chain []string
			for _, c := range iss.Chain {
				chain = append(chain, c.Subject.CommonName)
			}
			if strings.Join(chain, ",") != strings.Join(tt.wantChain, ",") {
				t.Errorf("chain %v, want %v", chain, tt.wantChain)
			}
		})
	}
}

func TestLoadFiles(t *testing.T) {
	p := newTestPKI(t, t0)
	write := func(dir string, files map[string][]byte) {
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	good := map[string][]byte{
		"ca.crt":  EncodeCertPEM(p.root),
		"tls.crt": EncodeCertPEM(p.issuer),
		"tls.key": mustKeyPEM(t, p.issuerKey),
	}

	t.Run("ok", func(t *testing.T) {
		dir := t.TempDir()
		write(dir, good)
		iss, anchors, err := LoadFiles(dir, t0)
		if err != nil {
			t.Fatal(err)
		}
		if !iss.Certificate.Equal(p.issuer) || len(anchors.Certificates()) != 1 || !anchors.Certificates()[0].Equal(p.root) {
			t.Fatal("loaded the wrong certificates")
		}
	})
	t.Run("Secret volume symlinks", func(t *testing.T) {
		// Kubernetes mounts a Secret as symlinks into a ..data directory.
		dir := t.TempDir()
		data := filepath.Join(dir, "..2026_03_01")
		if err := os.Mkdir(data, 0o755); err != nil {
			t.Fatal(err)
		}
		write(data, good)
		if err := os.Symlink(filepath.Base(data), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
		for name := range good {
			if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := LoadFiles(dir, t0); err != nil {
			t.Fatal(err)
		}
	})
	for _, missing := range []string{"ca.crt", "tls.crt", "tls.key"} {
		t.Run("missing "+missing, func(t *testing.T) {
			dir := t.TempDir()
			write(dir, good)
			if err := os.Remove(filepath.Join(dir, missing)); err != nil {
				t.Fatal(err)
			}
			_, _, err := LoadFiles(dir, t0)
			if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
				t.Fatalf("LoadFiles = %v, want not-exist error naming %s", err, missing)
			}
		})
	}
	t.Run("bad anchors", func(t *testing.T) {
		dir := t.TempDir()
		write(dir, good)
		write(dir, map[string][]byte{"ca.crt": []byte("junk")})
		if _, _, err := LoadFiles(dir, t0); !errors.Is(err, ErrInvalidAnchors) || !strings.Contains(err.Error(), "ca.crt") {
			t.Fatalf("LoadFiles = %v, want ErrInvalidAnchors naming ca.crt", err)
		}
	})
	t.Run("expired issuer", func(t *testing.T) {
		dir := t.TempDir()
		write(dir, good)
		if _, _, err := LoadFiles(dir, t0.Add(181*day)); !errors.Is(err, ErrInvalidIssuer) {
			t.Fatalf("LoadFiles = %v, want ErrInvalidIssuer", err)
		}
	})
}

func TestNewRootAndIntermediate(t *testing.T) {
	root, rootKey, err := NewRoot("root", 10*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !root.IsCA || root.MaxPathLen != -1 || root.MaxPathLenZero || root.CheckSignatureFrom(root) != nil {
		t.Errorf("root: IsCA=%v MaxPathLen=%d MaxPathLenZero=%v", root.IsCA, root.MaxPathLen, root.MaxPathLenZero)
	}
	if !root.NotBefore.Equal(t0) || !root.NotAfter.Equal(t0.Add(10*day)) {
		t.Errorf("root validity %s..%s", root.NotBefore, root.NotAfter)
	}
	if CheckPublicKey(root.PublicKey) != nil || len(root.SubjectKeyId) == 0 {
		t.Error("root key not P-256 or no subject key id")
	}
	inter, _, err := NewIntermediate(root, rootKey, "inter", 5*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !inter.IsCA || inter.MaxPathLen != 0 || !inter.MaxPathLenZero || inter.CheckSignatureFrom(root) != nil {
		t.Errorf("intermediate: IsCA=%v MaxPathLen=%d MaxPathLenZero=%v", inter.IsCA, inter.MaxPathLen, inter.MaxPathLenZero)
	}
	if inter.KeyUsage&0x20 == 0 { // certSign
		t.Error("intermediate cannot sign certificates")
	}
	if string(inter.AuthorityKeyId) != string(root.SubjectKeyId) {
		t.Error("intermediate authority key id does not name the root")
	}

	if _, _, err := NewRoot("r", 0, t0); err == nil {
		t.Error("NewRoot with zero validity succeeded")
	}
	if _, _, err := NewRoot("", day, t0); err == nil {
		t.Error("NewRoot with empty CN succeeded")
	}
	if _, _, err := NewIntermediate(nil, rootKey, "i", day, t0); err == nil {
		t.Error("NewIntermediate with nil parent succeeded")
	}
	if _, _, err := NewIntermediate(root, rootKey, "i", -day, t0); err == nil {
		t.Error("NewIntermediate with negative validity succeeded")
	}
	leaf := makeCert(t, certOpts{cn: "leaf", notBefore: t0, notAfter: t0.Add(day)}, &p256Key(t).PublicKey, root, rootKey)
	if _, _, err := NewIntermediate(leaf, rootKey, "i", day, t0); err == nil {
		t.Error("NewIntermediate under a non-CA succeeded")
	}
}
