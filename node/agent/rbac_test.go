package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/tunmesh/tunmesh/identity/rbac"
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
	err := rbac.Check(context.Background(), client, RequiredPermissions())
	if !errors.Is(err, rbac.ErrMissingPermission) || !strings.Contains(err.Error(), "watch endpointslices.discovery.k8s.io") {
		t.Fatalf("err = %v, want the missing endpointslices watch named", err)
	}
	if len(asked) != len(RequiredPermissions()) {
		t.Fatalf("asked %d reviews, want %d", len(asked), len(RequiredPermissions()))
	}
}
