package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"time"
)

// NewRoot creates a self-signed ECDSA P-256 root CA valid from now for
// validity, with no path length constraint. It is meant for development
// bootstrap and tests; production anchors come from cert-manager or an
// offline CA.
func NewRoot(cn string, validity time.Duration, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	if validity <= 0 {
		return nil, nil, fmt.Errorf("new root %q: validity %s is not positive", cn, validity)
	}
	key, tmpl, err := caTemplate(cn, validity, now)
	if err != nil {
		return nil, nil, fmt.Errorf("new root %q: %w", cn, err)
	}
	tmpl.MaxPathLen = -1 // unconstrained
	cert, err := create(tmpl, tmpl, key, key)
	if err != nil {
		return nil, nil, fmt.Errorf("new root %q: %w", cn, err)
	}
	return cert, key, nil
}

// NewIntermediate creates an ECDSA P-256 CA signed by parent, valid from now
// for validity, that may sign leaves only (MaxPathLen 0): the shape of a
// tunmesh issuer. Its validity is not cut to the parent's, so tests can
// build issuers that outlive their root.
func NewIntermediate(parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string, validity time.Duration, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	if parent == nil || parentKey == nil {
		return nil, nil, fmt.Errorf("new intermediate %q: nil parent", cn)
	}
	if !parent.IsCA {
		return nil, nil, fmt.Errorf("new intermediate %q: parent %s is not a CA", cn, parent.Subject)
	}
	if validity <= 0 {
		return nil, nil, fmt.Errorf("new intermediate %q: validity %s is not positive", cn, validity)
	}
	key, tmpl, err := caTemplate(cn, validity, now)
	if err != nil {
		return nil, nil, fmt.Errorf("new intermediate %q: %w", cn, err)
	}
	tmpl.MaxPathLen = 0
	tmpl.MaxPathLenZero = true
	cert, err := create(tmpl, parent, key, parentKey)
	if err != nil {
		return nil, nil, fmt.Errorf("new intermediate %q: %w", cn, err)
	}
	return cert, key, nil
}

func caTemplate(cn string, validity time.Duration, now time.Time) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	if cn == "" {
		return nil, nil, errors.New("empty common name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	return key, &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now,
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// SubjectKeyId: crypto/x509 derives it for CAs; leaves signed
		// by this CA then get a matching AuthorityKeyId.
	}, nil
}

func create(tmpl, parent *x509.Certificate, key, parentKey *ecdsa.PrivateKey) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse created certificate: %w", err)
	}
	return cert, nil
}
