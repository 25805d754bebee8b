package observe

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"time"
)

// TLSConfig is the API's server side: a certificate the agent makes for
// itself at start (ECDSA P-256, the node's name and address, one year)
// unless cert is given, and client certificates (with the client-auth
// usage) verified against clientCAs() as it is at each handshake, when
// the caller offers one (nil func or nil pool: none asked for; tokens
// only). The pool is read per handshake so that a rotated cluster CA is
// accepted without a restart.
// TLS 1.3 only. It also returns the certificate's SHA-256 fingerprint
// (hex), which the agent logs so that an operator can compare it with
// what tunmeshctl was shown.
func TLSConfig(node string, ip netip.Addr, cert *tls.Certificate, clientCAs func() *x509.CertPool) (*tls.Config, string, error) {
	if cert == nil {
		c, err := selfSigned(node, ip)
		if err != nil {
			return nil, "", err
		}
		cert = c
	}
	sum := sha256.Sum256(cert.Certificate[0])
	base := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*cert},
		ClientAuth:   tls.NoClientCert,
	}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		if clientCAs != nil {
			if pool := clientCAs(); pool != nil {
				c.ClientAuth, c.ClientCAs = tls.VerifyClientCertIfGiven, pool
			}
		}
		return c, nil
	}
	return cfg, hex.EncodeToString(sum[:]), nil
}

func selfSigned(node string, ip netip.Addr) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("observe serving key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return nil, fmt.Errorf("observe serving serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "tunmesh-node observe " + node},
		DNSNames:     []string{node},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if ip.IsValid() {
		tmpl.IPAddresses = []net.IP{ip.AsSlice()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("observe serving certificate: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
