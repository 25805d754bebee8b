package agent

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/tunmesh/tunmesh/identity/rbac"
	"github.com/tunmesh/tunmesh/node/release"
)

// TestRequiredPermissionsChecked: every permission is asked for with a
// SelfSubjectAccessReview, and a denied one fails start-up naming it.
func TestRequiredPermissionsChecked(t *testing.T) {
	client := fake.NewClientset()
	var asked []string
	client.PrependReactor("create", "selfsubjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		r := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SelfSubjectAccessReview)
		attr := r.Spec.ResourceAttributes
		p := rbac.Permission{Group: attr.Group, Resource: attr.Resource, Verb: attr.Verb, Namespace: attr.Namespace, Name: attr.Name}
		asked = append(asked, p.String())
		r.Status.Allowed = !(attr.Resource == "endpointslices" && attr.Verb == "watch")
		return true, r, nil
	})
	need := RequiredPermissions(release.DaemonSetDeleted, "tunmesh")
	err := rbac.Check(context.Background(), client, need)
	if !errors.Is(err, rbac.ErrMissingPermission) || !strings.Contains(err.Error(), "watch endpointslices.discovery.k8s.io") {
		t.Fatalf("err = %v, want the missing endpointslices watch named", err)
	}
	if len(asked) != len(need) {
		t.Fatalf("asked %d reviews, want %d", len(asked), len(need))
	}
	if !slices.ContainsFunc(asked, func(s string) bool { return strings.Contains(s, "watch daemonsets") }) {
		t.Fatalf("release on exit: the DaemonSet watch is not checked: %v", asked)
	}
	if n := len(RequiredPermissions(release.Never, "tunmesh")); n != len(need)-len(release.RequiredPermissions("tunmesh")) {
		t.Fatalf("release never: %d permissions, want the base list only", n)
	}
}
