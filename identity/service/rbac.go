package service

import (
	"github.com/tunmesh/tunmesh/identity/rbac"
)

// ErrMissingPermission is returned by Run when RBAC lacks a permission.
var ErrMissingPermission = rbac.ErrMissingPermission

// RequiredPermissions are the API calls tunmesh-identity makes, checked at
// start-up: TokenReviews of agent tokens and pod reads (authz.go: get by
// name, list by node; list+watch for the informer), the issuer Secret (get,
// and the informer's list/watch in the control namespace, rotation.go),
// and events in the control namespace (create, and patch for repeats by
// client-go's correlator).
func RequiredPermissions(controlNS, issuerSecret string) []rbac.Permission {
	return []rbac.Permission{
		{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"},
		{Resource: "pods", Verb: "get"},
		{Resource: "pods", Verb: "list"},
		{Resource: "pods", Verb: "watch"},
		{Resource: "secrets", Verb: "get", Namespace: controlNS, Name: issuerSecret},
		{Resource: "secrets", Verb: "list", Namespace: controlNS},
		{Resource: "secrets", Verb: "watch", Namespace: controlNS},
		{Resource: "events", Verb: "create", Namespace: controlNS},
		{Resource: "events", Verb: "patch", Namespace: controlNS},
	}
}
