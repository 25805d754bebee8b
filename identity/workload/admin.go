package workload

import (
	"encoding/json"
	"encoding/pem"
	"net/http"
	"sort"
)

// CertificatesPath is where the agent's admin server exposes the workload
// certificates it serves (public chains only, never keys), so that
// `tunmeshctl check` can verify the leaves themselves chain to the current
// trust anchors.
const CertificatesPath = "/identity/certificates"

// AdminPort is the agent's admin port (metrics, readiness, certificates).
const AdminPort = 4191

// CertificateChain is one identity in the CertificatesPath response.
type CertificateChain struct {
	Identity string   `json:"identity"`
	Chain    []string `json:"chain"` // PEM, leaf first
}

// CertificatesHandler serves the current chain of every identity.
func (m *Manager) CertificatesHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		m.mu.Lock()
		out := make([]CertificateChain, 0, len(m.entries))
		for id, e := range m.entries {
			if e.cert == nil {
				continue
			}
			cc := CertificateChain{Identity: id.String()}
			for _, der := range e.cert.Certificate {
				cc.Chain = append(cc.Chain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
			}
			out = append(out, cc)
		}
		m.mu.Unlock()
		sort.Slice(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
}
