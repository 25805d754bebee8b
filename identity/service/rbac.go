package service

import (
	"context"
	"fmt"
	"strings"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// permission is one thing the service needs from the API server.
type permission struct {
	group, resource, verb, namespace, name string
}

func (p permission) String() string {
	r := p.resource
	if p.group != "" {
		r += "." + p.group
	}
	s := p.verb + " " + r
	if p.name != "" {
		s += " " + p.name
	}
	if p.namespace != "" {
		s += " in namespace " + p.namespace
	}
	return s
}

// ErrMissingPermission is returned by Run when RBAC lacks a permission.
var ErrMissingPermission = fmt.Errorf("missing permission")

// checkPermissions asks the API server (SelfSubjectAccessReview) for each
// permission the service needs, so that a broken RBAC setup fails loudly at
// start-up instead of as refused requests later.
func checkPermissions(ctx context.Context, client kubernetes.Interface, controlNS, issuerSecret string) error {
	need := []permission{
		{group: "authentication.k8s.io", resource: "tokenreviews", verb: "create"},
		{resource: "pods", verb: "list"},
		{resource: "pods", verb: "watch"},
		{resource: "secrets", verb: "get", namespace: controlNS, name: issuerSecret},
		{resource: "secrets", verb: "list", namespace: controlNS},
		{resource: "secrets", verb: "watch", namespace: controlNS},
		{resource: "events", verb: "create", namespace: controlNS},
	}
	var missing []string
	for _, p := range need {
		review := &authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Group: p.group, Resource: p.resource, Verb: p.verb, Namespace: p.namespace, Name: p.name,
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
