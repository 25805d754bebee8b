package workload

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
)

// VerifyPath is where the agent's admin server answers whether the
// workload certificates it serves chain to trust anchors the caller sends
// (POST, a PEM bundle), so that `tunmeshctl check` can tell, after an
// anchor rotation, whether every agent holds certificates from the current
// anchors. The answer counts certificates and names distinct verification
// errors, never an identity: the admin port is reachable without
// authentication, and which ServiceAccounts run on a node is not for
// anyone who can reach it.
const VerifyPath = "/identity/verify"

// AdminPort is the agent's admin port (metrics, readiness, status).
const AdminPort = 4191

// maxAnchorsBody bounds the trust anchors a VerifyPath request may send.
const maxAnchorsBody = 64 << 10

// VerifyReport is the VerifyPath response.
type VerifyReport struct {
	// Certificates is how many workload certificates the agent serves.
	Certificates int `json:"certificates"`
	// Failed is how many of them do not chain to the anchors sent.
	Failed int `json:"failed"`
	// Errors are the distinct verification errors, sorted.
	Errors []string `json:"errors,omitempty"`
}

// VerifyChains verifies each chain ([leaf, intermediates...], DER, as a
// workload presents it) against roots at now.
func VerifyChains(roots *x509.CertPool, chains [][][]byte, now time.Time) VerifyReport {
	rep := VerifyReport{Certificates: len(chains)}
	seen := map[string]bool{}
	for _, chain := range chains {
		if err := verifyChain(roots, chain, now); err != nil {
			rep.Failed++
			if msg := err.Error(); !seen[msg] {
				seen[msg] = true
				rep.Errors = append(rep.Errors, msg)
			}
		}
	}
	sort.Strings(rep.Errors)
	return rep
}

func verifyChain(roots *x509.CertPool, chain [][]byte, now time.Time) error {
	if len(chain) == 0 {
		return fmt.Errorf("empty certificate chain")
	}
	certs := make([]*x509.Certificate, 0, len(chain))
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("parse certificate: %w", err)
		}
		certs = append(certs, c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	return err
}

// VerifyHandler serves VerifyPath: the request body is the trust anchors
// (PEM, at most 64 KiB); the response a VerifyReport over every identity's
// current certificate.
func (m *Manager) VerifyHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAnchorsBody))
		if err != nil {
			http.Error(w, "read trust anchors: "+err.Error(), http.StatusRequestEntityTooLarge)
			return
		}
		anchors, err := ca.ParseAnchors(body)
		if err != nil {
			http.Error(w, "trust anchors: "+err.Error(), http.StatusBadRequest)
			return
		}
		m.mu.Lock()
		chains := make([][][]byte, 0, len(m.entries))
		for _, e := range m.entries {
			if e.cert != nil {
				chains = append(chains, e.cert.Certificate)
			}
		}
		m.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(VerifyChains(anchors.Pool(), chains, time.Now()))
	})
}
