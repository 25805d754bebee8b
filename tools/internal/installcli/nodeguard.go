package installcli

import (
	"context"
	"fmt"
	"slices"
	"strings"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

// CheckNodeGuard is the name of the node guard's check.
const CheckNodeGuard = "the node guard confines each agent to its own Node's tunmesh annotations"

// NodeGuard verifies deploy/node-guard.yaml is in force: without it
// every agent's `patch` on nodes covers every Node and field, and one
// compromised agent could rewrite another node's WireGuard key or
// certificate pin. In force means: the ValidatingAdmissionPolicy fails
// closed and carries the validations this tunmeshctl ships (the
// expressions, verbatim: an edited or outdated policy is reported), and
// its binding denies, with no narrowing of what it matches.
func NodeGuard(ctx context.Context, client kubernetes.Interface) identitycli.Check {
	c := identitycli.Check{Name: CheckNodeGuard}
	want, _, err := shippedNodeGuard()
	if err != nil {
		c.Hint = err.Error()
		return c
	}
	reapply := "tunmeshctl install (or kubectl apply -f deploy/node-guard.yaml) puts it back"
	p, err := client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, deploy.NodeGuardName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		c.Hint = fmt.Sprintf("ValidatingAdmissionPolicy %s not found (Kubernetes >= 1.30 is needed): %s", deploy.NodeGuardName, reapply)
		return c
	}
	if err != nil {
		c.Hint = fmt.Sprintf("read ValidatingAdmissionPolicy %s: %v", deploy.NodeGuardName, err)
		return c
	}
	b, err := client.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Get(ctx, deploy.NodeGuardName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		c.Hint = fmt.Sprintf("ValidatingAdmissionPolicyBinding %s not found: the policy is not enforced; %s", deploy.NodeGuardName, reapply)
		return c
	}
	if err != nil {
		c.Hint = fmt.Sprintf("read ValidatingAdmissionPolicyBinding %s: %v", deploy.NodeGuardName, err)
		return c
	}
	var problems []string
	if fp := p.Spec.FailurePolicy; fp != nil && *fp != admissionv1.Fail {
		problems = append(problems, fmt.Sprintf("failurePolicy is %s, not Fail (an error in the policy would let writes through)", *fp))
	}
	if !slices.Equal(expressions(p.Spec), expressions(want.Spec)) || !slices.Equal(conditions(p.Spec), conditions(want.Spec)) ||
		!slices.Equal(rules(p.Spec), rules(want.Spec)) {
		problems = append(problems, "its validations, match conditions or matched resources differ from the ones this tunmeshctl ships (edited, or another version)")
	}
	if b.Spec.PolicyName != deploy.NodeGuardName {
		problems = append(problems, fmt.Sprintf("the binding points at policy %q", b.Spec.PolicyName))
	}
	if !slices.Contains(b.Spec.ValidationActions, admissionv1.Deny) {
		problems = append(problems, fmt.Sprintf("the binding's validationActions are %v, without Deny: violations are not refused", b.Spec.ValidationActions))
	}
	if narrows(b.Spec.MatchResources) {
		problems = append(problems, "the binding narrows what it matches (matchResources): some Nodes may be unguarded")
	}
	if b.Spec.ParamRef != nil {
		problems = append(problems, "the binding has a paramRef the policy does not use")
	}
	if len(problems) > 0 {
		c.Hint = strings.Join(problems, "; ") + "; " + reapply
		return c
	}
	c.OK = true
	return c
}

// narrows reports whether a binding's matchResources selects less than
// everything the policy matches (the API server defaults both selectors
// to the empty one, which selects everything).
func narrows(m *admissionv1.MatchResources) bool {
	if m == nil {
		return false
	}
	selects := func(ls *metav1.LabelSelector) bool {
		return ls != nil && len(ls.MatchLabels)+len(ls.MatchExpressions) > 0
	}
	return selects(m.NamespaceSelector) || selects(m.ObjectSelector) ||
		len(m.ResourceRules) > 0 || len(m.ExcludeResourceRules) > 0
}

// shippedNodeGuard is the policy and binding of deploy/node-guard.yaml.
func shippedNodeGuard() (*admissionv1.ValidatingAdmissionPolicy, *admissionv1.ValidatingAdmissionPolicyBinding, error) {
	data, err := deploy.Manifests.ReadFile("node-guard.yaml")
	if err != nil {
		return nil, nil, fmt.Errorf("read the shipped node guard: %w", err)
	}
	objs, err := deploy.Decode(data)
	if err != nil {
		return nil, nil, fmt.Errorf("shipped node guard: %w", err)
	}
	var (
		p admissionv1.ValidatingAdmissionPolicy
		b admissionv1.ValidatingAdmissionPolicyBinding
	)
	found := map[string]bool{}
	for _, o := range objs {
		var into any
		switch o.GetKind() {
		case "ValidatingAdmissionPolicy":
			into = &p
		case "ValidatingAdmissionPolicyBinding":
			into = &b
		default:
			continue
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, into); err != nil {
			return nil, nil, fmt.Errorf("shipped node guard: %s: %w", o.GetKind(), err)
		}
		found[o.GetKind()] = true
	}
	if !found["ValidatingAdmissionPolicy"] || !found["ValidatingAdmissionPolicyBinding"] {
		return nil, nil, fmt.Errorf("the shipped node-guard.yaml lacks its policy or binding")
	}
	return &p, &b, nil
}

func expressions(s admissionv1.ValidatingAdmissionPolicySpec) []string {
	var out []string
	for _, v := range s.Validations {
		out = append(out, v.Expression)
	}
	for _, v := range s.Variables {
		out = append(out, v.Name+"="+v.Expression)
	}
	return out
}

// rules are the resources and operations the policy matches (the API
// server defaults the rest of matchConstraints).
func rules(s admissionv1.ValidatingAdmissionPolicySpec) []string {
	if s.MatchConstraints == nil {
		return nil
	}
	var out []string
	for _, r := range s.MatchConstraints.ResourceRules {
		out = append(out, fmt.Sprint(r.APIGroups, r.APIVersions, r.Resources, r.Operations))
	}
	return out
}

func conditions(s admissionv1.ValidatingAdmissionPolicySpec) []string {
	var out []string
	for _, m := range s.MatchConditions {
		out = append(out, m.Name+"="+m.Expression)
	}
	return out
}
