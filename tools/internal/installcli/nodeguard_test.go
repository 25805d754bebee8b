package installcli

import (
	"context"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
)

func shippedGuard(t *testing.T) (*admissionv1.ValidatingAdmissionPolicy, *admissionv1.ValidatingAdmissionPolicyBinding) {
	t.Helper()
	p, b, err := shippedNodeGuard()
	if err != nil {
		t.Fatal(err)
	}
	return p, b
}

// TestCheckNodeGuard: the shipped policy and binding pass; a missing or
// weakened one fails with a hint that says what is wrong.
func TestCheckNodeGuard(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*admissionv1.ValidatingAdmissionPolicy, *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) // keep policy, keep binding
		hint string                                                                                                   // "" passes
	}{
		{"shipped", nil, ""},
		{"defaulted by the API server", func(p *admissionv1.ValidatingAdmissionPolicy, b *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			p.Spec.FailurePolicy = ptr.To(admissionv1.Fail)
			p.Spec.MatchConstraints.MatchPolicy = ptr.To(admissionv1.Equivalent)
			p.Spec.MatchConstraints.NamespaceSelector = &metav1.LabelSelector{}
			p.Spec.MatchConstraints.ObjectSelector = &metav1.LabelSelector{}
			b.Spec.MatchResources = &admissionv1.MatchResources{NamespaceSelector: &metav1.LabelSelector{}, ObjectSelector: &metav1.LabelSelector{}}
			return true, true
		}, ""},
		{"no policy", func(*admissionv1.ValidatingAdmissionPolicy, *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			return false, true
		}, "ValidatingAdmissionPolicy tunmesh-node-guard not found"},
		{"no binding", func(*admissionv1.ValidatingAdmissionPolicy, *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			return true, false
		}, "the policy is not enforced"},
		{"fails open", func(p *admissionv1.ValidatingAdmissionPolicy, _ *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			p.Spec.FailurePolicy = ptr.To(admissionv1.Ignore)
			return true, true
		}, "failurePolicy is Ignore"},
		{"a validation edited", func(p *admissionv1.ValidatingAdmissionPolicy, _ *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			p.Spec.Validations[2].Expression = "true"
			return true, true
		}, "differ from the ones this tunmeshctl ships"},
		{"nodes no longer matched", func(p *admissionv1.ValidatingAdmissionPolicy, _ *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			p.Spec.MatchConstraints.ResourceRules[0].Resources = []string{"configmaps"}
			return true, true
		}, "differ from the ones this tunmeshctl ships"},
		{"warn only", func(_ *admissionv1.ValidatingAdmissionPolicy, b *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			b.Spec.ValidationActions = []admissionv1.ValidationAction{admissionv1.Warn, admissionv1.Audit}
			return true, true
		}, "without Deny"},
		{"binding narrowed", func(_ *admissionv1.ValidatingAdmissionPolicy, b *admissionv1.ValidatingAdmissionPolicyBinding) (bool, bool) {
			b.Spec.MatchResources = &admissionv1.MatchResources{ObjectSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"guarded": "yes"}}}
			return true, true
		}, "narrows what it matches"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, b := shippedGuard(t)
			keepP, keepB := true, true
			if tc.edit != nil {
				keepP, keepB = tc.edit(p, b)
			}
			var objs []runtime.Object
			if keepP {
				objs = append(objs, p)
			}
			if keepB {
				objs = append(objs, b)
			}
			c := NodeGuard(context.Background(), fake.NewClientset(objs...))
			switch {
			case tc.hint == "" && !c.OK:
				t.Errorf("failed: %s", c.Hint)
			case tc.hint != "" && (c.OK || !strings.Contains(c.Hint, tc.hint)):
				t.Errorf("ok %v, hint %q; want failed with %q", c.OK, c.Hint, tc.hint)
			}
		})
	}
}
