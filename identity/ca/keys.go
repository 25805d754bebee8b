package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// KeyAlgorithm names a public key for people: "ECDSA P-256", "RSA 2048",
// "Ed25519", ...
func KeyAlgorithm(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil {
			return "ECDSA (no curve)"
		}
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			return "RSA"
		}
		return fmt.Sprintf("RSA %d", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519"
	case nil:
		return "no key"
	default:
		return fmt.Sprintf("unknown key type %T", pub)
	}
}

// CheckPublicKey accepts ECDSA P-256 keys, the only kind tunmesh uses for
// anchors, issuers and workloads: one algorithm keeps every TLS handshake on
// the fast, constant-time path and leaves nothing to negotiate. Other keys
// yield an error wrapping ErrUnsupportedAlgorithm that names what was found.
func CheckPublicKey(pub crypto.PublicKey) error {
	if k, ok := pub.(*ecdsa.PublicKey); ok && k != nil && k.Curve == elliptic.P256() {
		return nil
	}
	return fmt.Errorf("%w: %s, want ECDSA P-256", ErrUnsupportedAlgorithm, KeyAlgorithm(pub))
}

// EncodeCertPEM encodes certificates as consecutive CERTIFICATE blocks, in
// the order given (leaf first for a chain).
func EncodeCertPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// EncodeKeyPEM encodes a key as an "EC PRIVATE KEY" (SEC 1) block, the form
// cert-manager writes by default and openssl prints for EC keys.
func EncodeKeyPEM(key *ecdsa.PrivateKey) ([]byte, error) {
	if key == nil {
		return nil, errors.New("encode key: nil key")
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

// ParseKeyPEM parses an ECDSA P-256 private key from PEM, either an
// "EC PRIVATE KEY" (SEC 1) or a "PRIVATE KEY" (PKCS #8) block. An
// "EC PARAMETERS" block, as `openssl ecparam -genkey` writes, is skipped.
// Keys of other algorithms yield ErrUnsupportedAlgorithm; encrypted keys are
// rejected because nothing could supply the passphrase.
func ParseKeyPEM(keyPEM []byte) (*ecdsa.PrivateKey, error) {
	var key *ecdsa.PrivateKey
	rest := keyPEM
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		var (
			k   any
			err error
		)
		switch block.Type {
		case "EC PARAMETERS":
			continue
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(block.Bytes)
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			return nil, fmt.Errorf("parse key: %w: RSA, want ECDSA P-256", ErrUnsupportedAlgorithm)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("parse key: encrypted private keys are not supported")
		default:
			return nil, fmt.Errorf("parse key: unexpected PEM block %q", block.Type)
		}
		if err != nil {
			// x509 reports foreign PKCS #8 algorithms it cannot parse
			// (e.g. X25519 variants) as plain errors; keep its words.
			return nil, fmt.Errorf("parse key: %s: %w", block.Type, err)
		}
		if key != nil {
			return nil, errors.New("parse key: more than one private key in PEM")
		}
		ec, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("parse key: %w", CheckPublicKey(publicOf(k)))
		}
		if err := CheckPublicKey(&ec.PublicKey); err != nil {
			return nil, fmt.Errorf("parse key: %w", err)
		}
		key = ec
	}
	if key == nil {
		return nil, errors.New("parse key: no private key PEM block found")
	}
	return key, nil
}

func publicOf(k any) crypto.PublicKey {
	if s, ok := k.(crypto.Signer); ok {
		return s.Public()
	}
	return nil
}

// ParseCertificatesPEM returns the certificates of a PEM bundle in order. It is
// strict where sloppiness would hide a broken file: every block must be a
// CERTIFICATE that parses, and a "-----BEGIN" that pem.Decode could not read
// (a truncated copy-paste, say) is an error rather than silently skipped.
// Text between blocks, such as the comments in distribution bundles, is fine.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	blocks := 0
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		blocks++
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d: type %q, want CERTIFICATE", blocks-1, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", blocks-1, err)
		}
		certs = append(certs, c)
	}
	if n := bytes.Count(data, []byte("-----BEGIN ")); n != blocks {
		return nil, fmt.Errorf("malformed PEM: %d BEGIN lines but %d readable blocks", n, blocks)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate PEM block found")
	}
	return certs, nil
}
