package ca

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
)

func TestKeyPEM(t *testing.T) {
	key := p256Key(t)
	sec1 := mustKeyPEM(t, key)
	if !strings.HasPrefix(string(sec1), "-----BEGIN EC PRIVATE KEY-----") {
		t.Fatalf("EncodeKeyPEM wrote %q", strings.SplitN(string(sec1), "\n", 2)[0])
	}
	rsaKey := foreignKeys()[1].key.(*rsa.PrivateKey)
	p384 := foreignKeys()[0].key.(*ecdsa.PrivateKey)
	p384SEC1, err := EncodeKeyPEM(p384)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		in       []byte
		wantErr  string
		wantAlgo bool
	}{
		{name: "SEC 1", in: sec1},
		{name: "PKCS 8", in: pkcs8PEM(t, key)},
		{name: "EC PARAMETERS first", in: cat(pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{6, 8}}), sec1)},
		{name: "empty", wantErr: "no private key"},
		{name: "certificate only", in: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), wantErr: `unexpected PEM block "CERTIFICATE"`},
		{name: "two keys", in: cat(sec1, sec1), wantErr: "more than one"},
		{name: "RSA PKCS 1", in: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), wantErr: "RSA, want ECDSA P-256", wantAlgo: true},
		{name: "RSA PKCS 8", in: pkcs8PEM(t, rsaKey), wantErr: "RSA 2048, want ECDSA P-256", wantAlgo: true},
		{name: "Ed25519 PKCS 8", in: pkcs8PEM(t, foreignKeys()[2].key), wantErr: "Ed25519, want ECDSA P-256", wantAlgo: true},
		{name: "P-384 SEC 1", in: p384SEC1, wantErr: "ECDSA P-384, want ECDSA P-256", wantAlgo: true},
		{name: "P-384 PKCS 8", in: pkcs8PEM(t, p384), wantErr: "ECDSA P-384, want ECDSA P-256", wantAlgo: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseKeyPEM(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseKeyPEM = %v, want error containing %q", err, tt.wantErr)
				}
				if tt.wantAlgo != errors.Is(err, ErrUnsupportedAlgorithm) {
					t.Errorf("error %v: wraps ErrUnsupportedAlgorithm = %v, want %v", err, !tt.wantAlgo, tt.wantAlgo)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(key) {
				t.Error("parsed a different key")
			}
		})
	}
}

func TestCheckPublicKey(t *testing.T) {
	if err := CheckPublicKey(&p256Key(t).PublicKey); err != nil {
		t.Errorf("P-256: %v", err)
	}
	for _, fk := range foreignKeys() {
		err := CheckPublicKey(fk.key.Public())
		if !errors.Is(err, ErrUnsupportedAlgorithm) || !strings.Contains(err.Error(), fk.name) {
			t.Errorf("%s: %v", fk.name, err)
		}
	}
	for _, pub := range []any{nil, (*ecdsa.PublicKey)(nil), &ecdsa.PublicKey{}, "a string"} {
		if err := CheckPublicKey(pub); !errors.Is(err, ErrUnsupportedAlgorithm) {
			t.Errorf("CheckPublicKey(%#v) = %v", pub, err)
		}
	}
}
