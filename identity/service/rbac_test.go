package service

import (
	"slices"
	"testing"

	"github.com/tunmesh/tunmesh/identity/rbac"
)

// TestRequiredPermissionsCoverCalls: the code reads pods by name
// (getPod: Pods().Get), so the start-up check must ask for it.
func TestRequiredPermissionsCoverCalls(t *testing.T) {
	perms := RequiredPermissions("tunmesh", "tunmesh-identity-issuer")
	for _, want := range []rbac.Permission{
		{Resource: "pods", Verb: "get"},
		{Resource: "secrets", Verb: "get", Namespace: "tunmesh", Name: "tunmesh-identity-issuer"},
		{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"},
	} {
		if !slices.Contains(perms, want) {
			t.Errorf("RequiredPermissions lacks %s", want)
		}
	}
}
