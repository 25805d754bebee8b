package ca

import (
	"bytes"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
)

func TestParseAnchors(t *testing.T) {
	root1, _, err := NewRoot("root-1", 365*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	root2, root2Key, err := NewRoot("root-2", 365*day, t0)
	if err != nil {
		t.Fatal(err)
	}
	inter, _, err := NewIntermediate(root2, root2Key, "intermediate", day, t0)
	if err != nil {
		t.Fatal(err)
	}
	leaf := makeCert(t, certOpts{cn: "leaf", notBefore: t0, notAfter: t0.Add(day)}, &p256Key(t).PublicKey, root2, root2Key)
	pem1, pem2 := EncodeCertPEM(root1), EncodeCertPEM(root2)

	tests := []struct {
		name     string
		in       []byte
		wantCNs  []string
		wantErr  string
		wantAlgo bool // error must also wrap ErrUnsupportedAlgorithm
	}{
		{name: "one root", in: pem1, wantCNs: []string{"root-1"}},
		{name: "two roots for rotation", in: cat(pem1, pem2), wantCNs: []string{"root-1", "root-2"}},
		{name: "duplicates dropped", in: cat(pem1, pem2, pem1), wantCNs: []string{"root-1", "root-2"}},
		{name: "comments between blocks", in: cat([]byte("# old root\n"), pem1, []byte("\n# new root\n"), pem2, []byte("\n")), wantCNs: []string{"root-1", "root-2"}},
		{name: "intermediate as anchor", in: EncodeCertPEM(inter), wantCNs: []string{"intermediate"}},
		{name: "empty", in: nil, wantErr: "no certificate"},
		{name: "whitespace", in: []byte("\n \n"), wantErr: "no certificate"},
		{name: "garbage", in: []byte("not a pem file"), wantErr: "no certificate"},
		{name: "garbage DER", in: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}), wantErr: "PEM block 0"},
		{name: "truncated second block", in: cat(pem1, pem2[:len(pem2)/2]), wantErr: "malformed PEM"},
		{name: "missing END line", in: bytes.TrimSuffix(pem1, []byte("-----END CERTIFICATE-----\n")), wantErr: "malformed PEM"},
		{name: "key block", in: cat(pem1, pkcs8PEM(t, p256Key(t))), wantErr: `type "PRIVATE KEY"`},
		{name: "leaf is not a CA", in: cat(pem1, EncodeCertPEM(leaf)), wantErr: "certificate 1 (CN=leaf) is not a CA"},
	}
	for _, fk := range foreignKeys() {
		root := makeCert(t, certOpts{cn: "foreign", isCA: true, maxPathLen: -1, notBefore: t0, notAfter: t0.Add(day)}, fk.key.Public(), nil, fk.key)
		tests = append(tests, struct {
			name     string
			in       []byte
			wantCNs  []string
			wantErr  string
			wantAlgo bool
		}{name: fk.name + " root", in: cat(pem1, EncodeCertPEM(root)), wantErr: fk.name + ", want ECDSA P-256", wantAlgo: true})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseAnchors(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseAnchors succeeded, want error containing %q", tt.wantErr)
				}
				if !errors.Is(err, ErrInvalidAnchors) {
					t.Errorf("error %v does not wrap ErrInvalidAnchors", err)
				}
				if tt.wantAlgo != errors.Is(err, ErrUnsupportedAlgorithm) {
					t.Errorf("error %v: wraps ErrUnsupportedAlgorithm = %v, want %v", err, !tt.wantAlgo, tt.wantAlgo)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var cns []string
			for _, c := range a.Certificates() {
				cns = append(cns, c.Subject.CommonName)
			}
			if strings.Join(cns, ",") != strings.Join(tt.wantCNs, ",") {
				t.Errorf("anchors %v, want %v", cns, tt.wantCNs)
			}
			// PEM round-trips to the same anchors.
			again, err := ParseAnchors(a.PEM())
			if err != nil {
				t.Fatalf("reparse PEM(): %v", err)
			}
			if len(again.Certificates()) != len(tt.wantCNs) {
				t.Errorf("PEM() holds %d certificates, want %d", len(again.Certificates()), len(tt.wantCNs))
			}
			if a.Pool() == nil {
				t.Error("nil pool")
			}
		})
	}
}

func TestAnchorsAccessorsCopy(t *testing.T) {
	root, _, err := NewRoot("root", day, t0)
	if err != nil {
		t.Fatal(err)
	}
	a := mustAnchors(t, EncodeCertPEM(root))
	a.Certificates()[0] = nil
	p := a.PEM()
	p[0] = 'X'
	if a.Certificates()[0] == nil || a.PEM()[0] != '-' {
		t.Fatal("accessors expose internal state")
	}
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
