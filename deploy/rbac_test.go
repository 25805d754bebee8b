package deploy

import (
	"slices"
	"sort"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// permission is one API call a component makes: verb on group/resource,
// in Namespace ("" means cluster-wide, every namespace).
type permission struct {
	Group, Resource, Verb, Namespace string
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
	return p.Verb + " " + g + "/" + p.Resource + " " + where
}

// requiredPermissions are the API calls each ServiceAccount's code makes,
// read from the code (client calls, informers, event recorders and the
// start-up SelfSubjectAccessReviews):
//
//   - tunmesh-identity (identity/service): TokenReviews of agent tokens
//     (authz.go); pods get by name and list by ServiceAccount (authz.go),
//     list+watch demanded by checkPermissions (rbac.go); the issuer Secret
//     get + informer list/watch (rotation.go, rbac.go); core events
//     create/patch through the recorder in tunmesh (service.go).
//   - tunmesh-node (node/...): pod and namespace informers (clusterview)
//     and fresh reads on CNI ADD (pods/cni.go: Pods().Get,
//     Namespaces().Get); Service and EndpointSlice informers (resolve);
//     core events create/patch in any namespace (agent.go recorder). The
//     CNI installer in the same pod, on exit: its own pod (pods get) and
//     its DaemonSet in tunmesh (cni/cmd/tunmesh-cni-install/keep.go).
//
// The event recorder PATCHes repeated events (client-go's correlator), so
// patch is a call the code makes even though no line spells it.
var requiredPermissions = map[string][]permission{
	"tunmesh-identity": {
		{"authentication.k8s.io", "tokenreviews", "create", ""},
		{"", "pods", "get", ""},
		{"", "pods", "list", ""},
		{"", "pods", "watch", ""},
		{"", "secrets", "get", Namespace},
		{"", "secrets", "list", Namespace},
		{"", "secrets", "watch", Namespace},
		{"", "events", "create", Namespace},
		{"", "events", "patch", Namespace},
	},
	"tunmesh-node": {
		{"", "pods", "get", ""},
		{"", "pods", "list", ""},
		{"", "pods", "watch", ""},
		{"", "namespaces", "get", ""},
		{"", "namespaces", "list", ""},
		{"", "namespaces", "watch", ""},
		{"", "services", "list", ""},
		{"", "services", "watch", ""},
		{"discovery.k8s.io", "endpointslices", "list", ""},
		{"discovery.k8s.io", "endpointslices", "watch", ""},
		{"", "events", "create", ""},
		{"", "events", "patch", ""},
		{"apps", "daemonsets", "get", Namespace},
	},
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
				if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
					t.Errorf("%s: rule %+v: resourceNames/nonResourceURLs not modelled", b.roleKey, r)
				}
				for _, g := range r.APIGroups {
					for _, res := range r.Resources {
						for _, v := range r.Verbs {
							if g == "*" || res == "*" || v == "*" {
								t.Errorf("%s grants a wildcard: %+v", b.roleKey, r)
							}
							out[s.Namespace+"/"+s.Name] = append(out[s.Namespace+"/"+s.Name], permission{g, res, v, b.namespace})
						}
					}
				}
			}
		}
	}
	return out
}

func strs(ps []permission) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// TestRBACMatchesCode: the RBAC in the manifests grants each component
// exactly the calls its code makes, no more, no less.
func TestRBACMatchesCode(t *testing.T) {
	got := granted(t)
	for sa, want := range requiredPermissions {
		have := strs(got[Namespace+"/"+sa])
		need := strs(want)
		var missing, extra []string
		for _, p := range need {
			if !slices.Contains(have, p) {
				missing = append(missing, p)
			}
		}
		for _, p := range have {
			if !slices.Contains(need, p) {
				extra = append(extra, p)
			}
		}
		if len(missing) > 0 {
			t.Errorf("%s lacks: %s", sa, strings.Join(missing, "; "))
		}
		if len(extra) > 0 {
			t.Errorf("%s is granted more than it calls: %s", sa, strings.Join(extra, "; "))
		}
		delete(got, Namespace+"/"+sa)
	}
	for sa, ps := range got {
		t.Errorf("%s holds permissions no code needs: %v", sa, strs(ps))
	}
}
