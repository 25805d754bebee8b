package workload

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// ErrPeerIdentity means the peer presented a valid certificate for an
// identity other than the expected one.
var ErrPeerIdentity = errors.New("unexpected peer identity")

// certTimeout bounds how long a handshake waits for a first certificate.
const certTimeout = 10 * time.Second

// ClientConfig returns a TLS 1.3 client config presenting local's
// certificate and accepting only a server whose chain verifies against the
// trust anchors and whose SPIFFE ID is want.
func (m *Manager) ClientConfig(local, want spiffe.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Verification is by SPIFFE ID, not hostname: VerifyConnection below
		// (it also runs on resumed sessions, unlike VerifyPeerCertificate).
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.certificateNow(local)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return m.verifyPeer(cs.PeerCertificates, func(id spiffe.ID) error {
				if id != want {
					return fmt.Errorf("%w: got %s, want %s", ErrPeerIdentity, id, want)
				}
				return nil
			})
		},
	}
}

// ServerConfig returns a TLS 1.3 server config presenting local's
// certificate and requiring a client certificate that verifies against
// the trust anchors; authorize (nil allows any verified identity) decides
// on the client's SPIFFE ID.
func (m *Manager) ServerConfig(local spiffe.ID, authorize func(spiffe.ID) error) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAnyClientCert, // verified in VerifyConnection
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return m.certificateNow(local)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return m.verifyPeer(cs.PeerCertificates, func(id spiffe.ID) error {
				if authorize == nil {
					return nil
				}
				return authorize(id)
			})
		},
	}
}

func (m *Manager) certificateNow(id spiffe.ID) (*tls.Certificate, error) {
	ctx, cancel := context.WithTimeout(context.Background(), certTimeout)
	defer cancel()
	return m.Certificate(ctx, id)
}

// verifyPeer checks a presented chain against the trust anchors and hands
// its SPIFFE ID to check.
func (m *Manager) verifyPeer(certs []*x509.Certificate, check func(spiffe.ID) error) error {
	if len(certs) == 0 {
		return errors.New("peer presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         m.roots,
		Intermediates: inter,
		CurrentTime:   m.now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("verify peer certificate: %w", err)
	}
	id, err := spiffe.FromCertificate(certs[0])
	if err != nil {
		return fmt.Errorf("peer identity: %w", err)
	}
	return check(id)
}

// verify checks a freshly issued chain before it is served.
func (m *Manager) verify(chain [][]byte, want spiffe.ID) error {
	certs := make([]*x509.Certificate, 0, len(chain))
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("parse chain: %w", err)
		}
		certs = append(certs, c)
	}
	return m.verifyPeer(certs, func(id spiffe.ID) error {
		if id != want {
			return fmt.Errorf("%w: issued for %s, asked for %s", ErrPeerIdentity, id, want)
		}
		return nil
	})
}
