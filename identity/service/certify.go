package service

import (
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

const maxRequestBytes = 64 << 10

// handleCertify answers POST /v1/certify: authenticate the agent, check
// the requested identity lives on the agent's node, check and sign the CSR.
func (s *Service) handleCertify(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	defer func() { s.metrics.latency.Observe(time.Since(start).Seconds()) }()
	chain, id, node, err := s.certify(r)
	if err != nil {
		code, status := errorStatus(err)
		s.metrics.refusals.WithLabelValues(string(code)).Inc()
		// The token is never logged; the reason and the claimed identity are.
		s.log.Info("certify refused", "code", code, "identity", id, "node", node, "err", err)
		writeJSON(w, status, &api.Error{Code: code, Message: err.Error()})
		return
	}
	resp := api.CertifyResponse{}
	for _, der := range chain {
		resp.Chain = append(resp.Chain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	}
	if leaf, err := parseLeaf(chain); err == nil {
		resp.NotAfter = leaf.NotAfter
	}
	s.metrics.issued.Inc()
	s.log.Info("certificate issued", "identity", id, "node", node, "not_after", resp.NotAfter)
	writeJSON(w, http.StatusOK, &resp)
}

func (s *Service) certify(r *http.Request) (chain [][]byte, id string, node string, err error) {
	if !s.Ready() {
		return nil, "", "", refuse(api.CodeUnavailable, "service is starting")
	}
	var req api.CertifyRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, "", "", refuse(api.CodeBadRequest, "decode request: %v", err)
	}
	sid, err := spiffe.Parse(req.Identity)
	if err != nil {
		return nil, req.Identity, "", refuse(api.CodeBadRequest, "identity: %v", err)
	}
	if err := checkIdentity(sid, s.ca.Config().TrustDomain, s.ca.Config().ControlNamespace); err != nil {
		return nil, req.Identity, "", err
	}
	node, err = s.agentNode(r.Context(), bearer(r.Header.Get("Authorization")))
	if err != nil {
		return nil, req.Identity, "", err
	}
	if err := s.authorizeNode(r.Context(), node, sid); err != nil {
		return nil, req.Identity, node, err
	}
	chain, err = s.ca.Sign(req.CSR, sid, s.now())
	return chain, req.Identity, node, err
}

// checkIdentity refuses identities the service never issues: another trust
// domain, and every identity of the control namespace. The control plane's
// identities are never workload identities: an agent on the identity
// service's node holding one could pass for the control plane to other
// agents and collect their tokens.
func checkIdentity(id spiffe.ID, trustDomain, controlNS string) error {
	if id.TrustDomain != trustDomain {
		return refuse(api.CodeBadRequest, "identity %s is not in trust domain %q", id, trustDomain)
	}
	if id.Namespace == controlNS {
		return refuse(api.CodeReservedIdentity, "identity %s is in the control namespace %q", id, controlNS)
	}
	return nil
}

// errorStatus is the one place that maps errors to API codes and HTTP
// statuses.
func errorStatus(err error) (api.Code, int) {
	var ref *refusal
	switch {
	case errors.As(err, &ref):
		switch ref.code {
		case api.CodeBadRequest:
			return ref.code, http.StatusBadRequest
		case api.CodeUnauthenticated:
			return ref.code, http.StatusUnauthorized
		case api.CodeUnavailable:
			return ref.code, http.StatusServiceUnavailable
		default:
			return ref.code, http.StatusForbidden
		}
	case errors.Is(err, ca.ErrUnsupportedAlgorithm):
		return api.CodeKeyAlgorithm, http.StatusBadRequest
	case errors.Is(err, ca.ErrSANMismatch):
		return api.CodeSANMismatch, http.StatusForbidden
	case errors.Is(err, ca.ErrBadCSR):
		return api.CodeBadCSR, http.StatusBadRequest
	default:
		return api.CodeInternal, http.StatusInternalServerError
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
