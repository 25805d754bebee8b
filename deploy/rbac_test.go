package deploy

import (
	"slices"
	"sort"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/tunmesh/tunmesh/cni/install/keep"
	"github.com/tunmesh/tunmesh/identity/rbac"
	"github.com/tunmesh/tunmesh/identity/service"
	"github.com/tunmesh/tunmesh/node/agent"
	"github.com/tunmesh/tunmesh/node/release"
)

// permission is an RBAC grant or need: a rule without resourceNames
// grants a call on any name (Name empty).
type permission struct {
	Group, Resource, Verb, Namespace, Name string
}

func (p permission) String() string {
	where := "cluster-wide"
	if p.Namespace != "" {
		where = "in " + p.Namespace
	}
	g := p.Group
	if g == "" {
		g = "core"
	}
	if p.Name != "" {
		where = p.Name + " " + where
	}
	return p.Verb + " " + g + "/" + p.Resource + " " + where
}

func fromRBAC(ps ...[]rbac.Permission) []permission {
	var out []permission
	for _, list := range ps {
		for _, p := range list {
			out = append(out, permission{p.Group, p.Resource, p.Verb, p.Namespace, p.Name})
		}
	}
	return out
}

// requiredPermissions are the API calls each ServiceAccount's code makes,
// as the code itself lists them (and checks them at start-up):
// tunmesh-identity's service, and in the node pod the agent and the CNI
// installer's exit decision.
func requiredPermissions() map[string][]permission {
	return map[string][]permission{
		"tunmesh-identity": fromRBAC(service.RequiredPermissions(Namespace, IssuerSecretName)),
		"tunmesh-node":     fromRBAC(agent.RequiredPermissions(release.DaemonSetDeleted, Namespace), keep.RequiredPermissions(Namespace)),
	}
}

// granted expands the RBAC objects of the manifests into the permissions
// each ServiceAccount (namespace/name) holds.
func granted(t *testing.T) map[string][]permission {
	t.Helper()
	roles := map[string][]rbacv1.PolicyRule{} // "ClusterRole/name" or "Role/ns/name"
	type binding struct {
		roleKey, namespace string
		subjects           []rbacv1.Subject
	}
	var bindings []binding
	for _, o := range objects(t) {
		switch o.GetKind() {
		case "ClusterRole", "Role":
			var r rbacv1.Role // same rules field for both kinds
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &r); err != nil {
				t.Fatal(err)
			}
			key := "ClusterRole/" + o.GetName()
			if o.GetKind() == "Role" {
				key = "Role/" + o.GetNamespace() + "/" + o.GetName()
			}
			roles[key] = r.Rules
		case "ClusterRoleBinding", "RoleBinding":
			var b rbacv1.RoleBinding
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &b); err != nil {
				t.Fatal(err)
			}
			key := "ClusterRole/" + b.RoleRef.Name
			if b.RoleRef.Kind == "Role" {
				key = "Role/" + o.GetNamespace() + "/" + b.RoleRef.Name
			}
			bindings = append(bindings, binding{key, o.GetNamespace(), b.Subjects})
		}
	}
	out := map[string][]permission{}
	for _, b := range bindings {
		rules, ok := roles[b.roleKey]
		if !ok {
			t.Errorf("binding to undefined %s", b.roleKey)
			continue
		}
		for _, s := range b.subjects {
			if s.Kind != "ServiceAccount" {
				t.Errorf("%s bound to %s %s: only ServiceAccounts expected", b.roleKey, s.Kind, s.Name)
				continue
			}
			for _, r := range rules {
				if len(r.NonResourceURLs) > 0 {
					t.Errorf("%s: rule %+v: nonResourceURLs not modelled", b.roleKey, r)
				}
				names := r.ResourceNames
				if len(names) == 0 {
					names = []string{""}
				}
				for _, g := range r.APIGroups {
					for _, res := range r.Resources {
						for _, v := range r.Verbs {
							if g == "*" || res == "*" || v == "*" {
								t.Errorf("%s grants a wildcard: %+v", b.roleKey, r)
							}
							for _, name := range names {
								out[s.Namespace+"/"+s.Name] = append(out[s.Namespace+"/"+s.Name], permission{g, res, v, b.namespace, name})
							}
						}
					}
				}
			}
		}
	}
	return out
}

// TestRBACMatchesCode: the RBAC in the manifests grants each component
// exactly the calls its code makes, no more, no less. A need in one
// namespace is met by a cluster-wide grant; a grant is needed when some
// call has its verb and resource in its scope.
func TestRBACMatchesCode(t *testing.T) {
	got := granted(t)
	for sa, need := range requiredPermissions() {
		have := got[Namespace+"/"+sa]
		covers := func(g, n permission) bool {
			return g.Group == n.Group && g.Resource == n.Resource && g.Verb == n.Verb && (g.Namespace == "" || g.Namespace == n.Namespace) && (g.Name == "" || g.Name == n.Name)
		}
		var missing, extra []string
		for _, n := range need {
			if !slices.ContainsFunc(have, func(g permission) bool { return covers(g, n) }) {
				missing = append(missing, n.String())
			}
		}
		for _, g := range have {
			if !slices.ContainsFunc(need, func(n permission) bool {
				return g.Group == n.Group && g.Resource == n.Resource && g.Verb == n.Verb && g.Namespace == n.Namespace && (g.Name == "" || g.Name == n.Name)
			}) {
				extra = append(extra, g.String())
			}
		}
		if len(missing) > 0 {
			t.Errorf("%s lacks: %s", sa, strings.Join(strs(missing), "; "))
		}
		if len(extra) > 0 {
			t.Errorf("%s is granted more than it calls: %s", sa, strings.Join(strs(extra), "; "))
		}
		delete(got, Namespace+"/"+sa)
	}
	for sa, ps := range got {
		t.Errorf("%s holds permissions no code needs: %v", sa, ps)
	}
}

func strs(s []string) []string {
	sort.Strings(s)
	return slices.Compact(s)
}
