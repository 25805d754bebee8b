// Package api holds the wire format of tunmesh-identity's versioned HTTPS
// API, shared by the service and its clients (the node agents).
//
//	POST /v1/certify
//	Authorization: Bearer <projected ServiceAccount token of the node agent, audience tunmesh-identity>
//	{"identity": "spiffe://cluster.local/ns/default/sa/web", "csr": "<base64 DER>"}
//
// Success: 200 {"chain": ["<PEM leaf>", "<PEM issuer>", ...], "notAfter": "..."}.
// Refusal: 4xx/5xx {"code": "<Code>", "message": "..."}; the code says why.
package api

import "time"

// CertifyPath is the endpoint of version 1 of the API.
const CertifyPath = "/v1/certify"

// Audience is the audience the agent's ServiceAccount token must carry.
const Audience = "tunmesh-identity"

// CertifyRequest asks for a leaf certificate for Identity.
type CertifyRequest struct {
	Identity string `json:"identity"` // SPIFFE ID
	CSR      []byte `json:"csr"`      // DER certificate request
}

// CertifyResponse carries the issued chain, leaf first.
type CertifyResponse struct {
	Chain    []string  `json:"chain"` // PEM certificates
	NotAfter time.Time `json:"notAfter"`
}

// Code says why a request was refused. Clients branch on it.
type Code string

// Refusal codes, one per check of the service.
const (
	CodeBadRequest        Code = "bad_request"          // malformed body or identity
	CodeUnauthenticated   Code = "unauthenticated"      // no token, or TokenReview did not authenticate it (expired, revoked, wrong audience)
	CodeNotAgent          Code = "not_agent"            // authenticated, but not the node agent's ServiceAccount
	CodeAgentPodUnknown   Code = "agent_pod_unknown"    // the token is not bound to a running agent pod on a node
	CodeIdentityNotOnNode Code = "identity_not_on_node" // no pod of that ServiceAccount is scheduled on the agent's node
	CodeReservedIdentity  Code = "reserved_identity"    // the identity belongs to the control plane (its namespace), never issued to workloads
	CodeRateLimited       Code = "rate_limited"         // too many requests from this client address; retry later
	CodeBadCSR            Code = "bad_csr"              // CSR malformed or badly signed
	CodeKeyAlgorithm      Code = "key_algorithm"        // CSR key is not ECDSA P-256
	CodeSANMismatch       Code = "san_mismatch"         // CSR asks for names other than the identity
	CodeUnavailable       Code = "unavailable"          // the service cannot decide now (API server unreachable); retry
	CodeInternal          Code = "internal"
)

// Error is the body of every refusal.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }
