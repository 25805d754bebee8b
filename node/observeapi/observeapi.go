// Package observeapi is the wire format of the agent's observability API
// (node/observe), shared with tunmeshctl without linking the agent (as
// cni/cniapi is for the CNI plugin).
package observeapi

// DefaultPort is the observability API's port on the node address.
const DefaultPort = 4192

// TokenAudience is the audience a bearer token must be bound to for the
// agents to accept it (kubectl create token SA --audience
// tunmesh.io/observe): a token the API server accepts is refused, so
// callers never hand a node one.
const TokenAudience = "tunmesh.io/observe"

// Paths of the API.
const (
	CapturePath = "/v1/capture"
	TapPath     = "/v1/tap"
	EdgesPath   = "/v1/edges"
	PodsPath    = "/v1/pods"
)

// FingerprintAnnotation is set by each agent on its Node: the SHA-256 (hex)
// of the observability API's serving certificate. tunmeshctl reads it
// through the API server (which it trusts) and accepts only that
// certificate from the node's agent, so a bearer token is never sent to an
// impostor.
const FingerprintAnnotation = "observe.tunmesh.io/serving-certificate-sha256"

// PodCert is a meshed pod and the certificate its agent holds for it.
type PodCert struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Identity  string `json:"identity"`
	// Chain is the leaf and its intermediates, PEM.
	Chain string `json:"chain,omitempty"`
	// Error says why there is no certificate.
	Error string `json:"error,omitempty"`
}
