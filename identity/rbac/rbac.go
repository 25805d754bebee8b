// Package rbac names the Kubernetes API permissions a tunmesh component
// needs and checks them at start-up with SelfSubjectAccessReviews, so that
// a broken RBAC setup fails loudly and early, naming what is missing,
// instead of as refused requests later. The lists themselves live with the
// code that makes the calls (service.RequiredPermissions for
// tunmesh-identity, agent.RequiredPermissions for tunmesh-node); tests of
// the manifests compare them with the RBAC objects.
package rbac

import (
	"context"
	"errors"
	"fmt"
	"strings"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Permission is one API call a component makes: Verb on Group/Resource, in
// Namespace ("" means every namespace), on the object Name ("" means any).
type Permission struct {
	Group, Resource, Verb, Namespace, Name string
}

// String reads as "verb resource[.group] [name] [in namespace ns]".
func (p Permission) String() string {
	r := p.Resource
	if p.Group != "" {
		r += "." + p.Group
	}
	s := p.Verb + " " + r
	if p.Name != "" {
		s += " " + p.Name
	}
	if p.Namespace != "" {
		s += " in namespace " + p.Namespace
	}
	return s
}

// ErrMissingPermission is wrapped by Check when a permission is denied.
var ErrMissingPermission = errors.New("missing permission")

// Check asks the API server for each permission and returns an error
// wrapping ErrMissingPermission that lists every one denied.
func Check(ctx context.Context, client kubernetes.Interface, need []Permission) error {
	var missing []string
	for _, p := range need {
		review := &authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Group: p.Group, Resource: p.Resource, Verb: p.Verb, Namespace: p.Namespace, Name: p.Name,
			},
		}}
		res, err := client.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, review, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("check permission %s: %w", p, err)
		}
		if !res.Status.Allowed {
			missing = append(missing, p.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s", ErrMissingPermission, strings.Join(missing, "; "))
	}
	return nil
}
