package policy

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// Policy builders in the upstream tests' style; namespaces are model
// names (x, y, z), mapped to the real ones by model.apply.

func np(ns, name string, podSel *metav1.LabelSelector, types ...networkingv1.PolicyType) *networkingv1.NetworkPolicy {
	if len(types) == 0 {
		types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	}
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: *podSel, PolicyTypes: types}}
}

func sel(kv ...string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	for i := 0; i+1 < len(kv); i += 2 {
		if s.MatchLabels == nil {
			s.MatchLabels = map[string]string{}
		}
		s.MatchLabels[kv[i]] = kv[i+1]
	}
	return s
}

func expr(key string, op metav1.LabelSelectorOperator, vals ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: key, Operator: op, Values: vals}}}
}

func tcpPort(p intstr.IntOrString) networkingv1.NetworkPolicyPort {
	proto := corev1.ProtocolTCP
	return networkingv1.NetworkPolicyPort{Protocol: &proto, Port: &p}
}

func withIngress(p *networkingv1.NetworkPolicy, ports []networkingv1.NetworkPolicyPort, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
	p.Spec.Ingress = append(p.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{Ports: ports, From: peers})
	return p
}

func withEgress(p *networkingv1.NetworkPolicy, ports []networkingv1.NetworkPolicyPort, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
	p.Spec.Egress = append(p.Spec.Egress, networkingv1.NetworkPolicyEgressRule{Ports: ports, To: peers})
	return p
}

func peer(nsSel, podSel *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: nsSel, PodSelector: podSel}
}

const propagation = 20 * time.Second // informer delivery to every agent, generously

func TestNetworkPolicyAndAuthorization(t *testing.T) {
	c := e2eenv.Need(t)
	m := newModel(t, c)
	x, y, z := "x", "y", "z"
	xa, xb, xc := podRef{x, "a"}, podRef{x, "b"}, podRef{x, "c"}
	ya, yb, yc := podRef{y, "a"}, podRef{y, "b"}, podRef{y, "c"}
	za, zb := podRef{z, "a"}, podRef{z, "b"}
	meshed := allModelPods()
	withPlain := append(append([]podRef{}, meshed...), m.plain)
	podA := sel("pod", "a")

	t.Run("baseline: every pod reaches every pod, meshed and plaintext", func(t *testing.T) {
		m.check(t, 80, newReach(true, withPlain, meshed), propagation)
	})

	t.Run("egress default-deny in x stops its meshed pods reaching a non-meshed pod", func(t *testing.T) {
		// Passed-through (plaintext) flows of meshed pods leave through the
		// agent's host TUN, not the pod's veth where a CNI enforces egress:
		// the agent applies the egress policy itself (review finding 2).
		rows, cols := []podRef{xa, xb, ya}, []podRef{m.plain}
		m.check(t, 80, newReach(true, rows, cols), propagation)
		before := agentMetric(t, c, "tunmesh_policy_denials_total", `policy_name="deny-egress"`)
		defer m.apply(t, np(x, "deny-egress", sel(), networkingv1.PolicyTypeEgress))()
		want := newReach(true, rows, cols)
		want.expectPeer(x, "", "", "", false)
		m.check(t, 80, want, propagation)
		if after := agentMetric(t, c, "tunmesh_policy_denials_total", `policy_name="deny-egress"`); after <= before {
			t.Errorf("tunmesh_policy_denials_total for deny-egress %v -> %v: want the plaintext egress denials counted", before, after)
		}
	})

	t.Run("egress default-deny in x drops its meshed pods' UDP; allowing UDP 53 lets exactly that through", func(t *testing.T) {
		testUDPEgress(t, m)
	})

	t.Run("default-deny ingress in x blocks meshed and plaintext clients", func(t *testing.T) {
		before := agentMetric(t, c, "tunmesh_policy_denials_total", `policy_name="deny-ingress"`)
		defer m.apply(t, np(x, "deny-ingress", sel()))()
		want := newReach(true, withPlain, meshed)
		want.expectPeer("", "", x, "", false)
		m.check(t, 80, want, propagation)
		after := agentMetric(t, c, "tunmesh_policy_denials_total", `policy_name="deny-ingress"`)
		plain := agentMetric(t, c, "tunmesh_policy_denials_total", `enforced_at="plaintext"`)
		if after <= before || plain == 0 {
			t.Errorf("tunmesh_policy_denials_total for deny-ingress %v -> %v, plaintext denials %v: want both counted", before, after, plain)
		}
	})

	allowYB := withIngress(np(x, "allow-y-b-on-serve-80", podA), []networkingv1.NetworkPolicyPort{tcpPort(intstr.FromString("serve-80-tcp"))},
		peer(sel("ns", y), sel("pod", "b")))
	t.Run("an allowing policy by namespaceSelector+podSelector on a named port lets exactly those through", func(t *testing.T) {
		defer m.apply(t, np(x, "deny-ingress", sel()), allowYB)()
		want := newReach(true, withPlain, meshed)
		want.expectPeer("", "", x, "", false)
		want[yb][xa] = true
		m.check(t, 80, want, propagation)
		want[yb][xa] = false // the named port is 80 only
		m.check(t, 81, want, propagation)
	})

	t.Run("a pod label change takes effect", func(t *testing.T) {
		defer m.apply(t, np(x, "deny-ingress", sel()), allowYB)()
		rows := []podRef{yb, yc, zb}
		want := newReach(false, rows, []podRef{xa})
		want[yb][xa] = true
		m.check(t, 80, want, propagation)
		relabel := func(ref podRef, v string) {
			patch := fmt.Sprintf(`{"metadata":{"labels":{"pod":%q}}}`, v)
			if _, err := c.Client.CoreV1().Pods(m.ns(ref.ns)).Patch(context.Background(), ref.name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		relabel(yc, "b")
		defer relabel(yc, "c")
		start := time.Now()
		want[yc][xa] = true
		m.check(t, 80, want, propagation)
		t.Logf("label change effective after %s (including the probes)", time.Since(start).Round(time.Millisecond))
		relabel(yc, "c")
		want[yc][xa] = false
		m.check(t, 80, want, propagation)
	})

	// A representative set of the upstream cases (test/e2e/network/netpol,
	// restated with their expected matrices in node/netpol's
	// upstream_cases_test.go), end to end for meshed pods.
	only81FromY := func(r reach) {
		r.expectPeer(x, "", x, "a", false)
		r.expectPeer(y, "", x, "a", true)
		r.expectPeer(z, "", x, "a", false)
	}
	type step struct {
		port   int
		before func(t *testing.T) // e.g. a namespace label change; its undo is registered with t.Cleanup
		reach  func(r reach)      // nil: all allowed
	}
	labelNS := func(short, k, v string) func(t *testing.T) {
		return func(t *testing.T) {
			set := func(val string) {
				patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, k, val)
				if _, err := c.Client.CoreV1().Namespaces().Patch(context.Background(), m.ns(short), types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			set(fmt.Sprintf("%q", v))
			t.Cleanup(func() { set("null") })
		}
	}
	for _, tc := range []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		steps    []step
	}{
		{name: "upstream: should support a 'default-deny-all' policy",
			policies: []*networkingv1.NetworkPolicy{np(x, "deny-all", sel(), networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress)},
			steps: []step{{port: 80, reach: func(r reach) {
				r.expectPeer("", "", x, "", false)
				r.expectPeer(x, "", "", "", false)
			}}}},
		{name: "upstream: should enforce policy to allow traffic from pods within server namespace based on PodSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "x-a-allows-x-b", podA), nil, peer(nil, sel("pod", "b")))},
			steps: []step{{port: 80, reach: func(r reach) {
				r.expectAllIngress(xa, false)
				r[xb][xa] = true
			}}}},
		{name: "upstream: should enforce policy to allow ingress traffic for a target",
			policies: []*networkingv1.NetworkPolicy{np(x, "deny-all", sel()), withIngress(np(x, "allow-all-to-a", podA), nil, peer(sel(), sel()))},
			steps: []step{{port: 80, reach: func(r reach) {
				r.expectAllIngress(xb, false)
				r.expectAllIngress(xc, false)
			}}}},
		{name: "upstream: should enforce policy based on PodSelector or NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-match-selector", podA), nil,
				peer(expr("ns", metav1.LabelSelectorOpNotIn, x), nil), peer(nil, sel("pod", "b")))},
			steps: []step{{port: 80, reach: func(r reach) {
				r[xc][xa] = false // and x/a itself, left out: a self-connection
			}}}},
		{name: "upstream: should enforce policy based on PodSelector and NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-podselector-and-nsselector", podA), nil,
				peer(expr("ns", metav1.LabelSelectorOpNotIn, x), sel("pod", "b")))},
			steps: []step{{port: 80, reach: func(r reach) {
				r.expectAllIngress(xa, false)
				r[yb][xa] = true
				r[zb][xa] = true
			}}}},
		{name: "upstream: should enforce policy based on Ports",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-ns-selector", podA),
				[]networkingv1.NetworkPolicyPort{tcpPort(intstr.FromInt32(81))}, peer(sel("ns", y), nil))},
			steps: []step{{port: 81, reach: only81FromY}}},
		{name: "upstream: should allow ingress access on one named port",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-all", sel()), []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("serve-81-tcp"))}})},
			steps:    []step{{port: 81}, {port: 80, reach: func(r reach) { r.expectPeer("", "", x, "", false) }}}},
		{name: "upstream: should allow egress access on one named port",
			policies: []*networkingv1.NetworkPolicy{withEgress(np(x, "allow-egress", sel(), networkingv1.PolicyTypeEgress),
				[]networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("serve-80-tcp"))}})},
			steps: []step{{port: 80}, {port: 81, reach: func(r reach) { r.expectPeer(x, "", "", "", false) }}}},
		{name: "upstream: should allow ingress access from updated namespace",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-ns-selector", podA), nil, peer(sel("ns2", "updated"), nil))},
			steps: []step{
				{port: 80, reach: func(r reach) { r.expectAllIngress(xa, false) }},
				{port: 80, before: labelNS(y, "ns2", "updated"), reach: func(r reach) {
					r.expectAllIngress(xa, false)
					r.expectPeer(y, "", x, "a", true)
				}},
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer m.apply(t, tc.policies...)()
			for _, st := range tc.steps {
				if st.before != nil {
					st.before(t)
				}
				want := newReach(true, meshed, meshed)
				if st.reach != nil {
					st.reach(want)
				}
				m.check(t, st.port, want, propagation)
			}
		})
	}

	t.Run("all-authenticated refuses a plaintext client and keeps probes working", func(t *testing.T) {
		annotate := func(v string) {
			val := "null"
			if v != "" {
				val = fmt.Sprintf("%q", v)
			}
			patch := fmt.Sprintf(`{"metadata":{"annotations":{"config.tunmesh.io/default-inbound-policy":%s}}}`, val)
			if _, err := c.Client.CoreV1().Pods(m.ns(x)).Patch(context.Background(), "b", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		e2eenv.WaitFor(t, propagation, "x/b ready", func() error {
			if !e2eenv.PodReady(c.Pod(t, m.ns(x), "b")) {
				return fmt.Errorf("not ready")
			}
			return nil
		})
		annotate("all-authenticated")
		defer annotate("")
		want := newReach(true, []podRef{m.plain, ya, za, xa}, []podRef{xb})
		want[m.plain][xb] = false
		m.check(t, 80, want, propagation)
		// The kubelet's readiness probe (tcpSocket 80, every second,
		// failure threshold 1) keeps passing.
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
			if p := c.Pod(t, m.ns(x), "b"); !e2eenv.PodReady(p) {
				t.Fatalf("x/b not ready under all-authenticated: kubelet probes refused (%v)", p.Status.Conditions)
			}
		}
	})

	t.Run("an authorization admitting one ServiceAccount refuses another with a valid certificate", func(t *testing.T) {
		defer m.applyYAML(t, `apiVersion: policy.tunmesh.io/v1alpha1
kind: Authorization
metadata:
  namespace: NS(x)
  name: friends-only
spec:
  podSelector:
    matchLabels:
      pod: c
  ports:
  - port: serve-80-tcp
  from:
  - serviceAccount:
      name: friend
      namespace: NS(y)
`)()
		want := newReach(false, []podRef{ya, yb, za, m.plain}, []podRef{xc})
		want[ya][xc] = true
		m.check(t, 80, want, propagation)
		want[ya][xc] = false // port 81 is not in the authorization
		m.check(t, 81, want, propagation)
		if n := agentMetric(t, c, "tunmesh_policy_denials_total", `policy_name="friends-only"`); n == 0 {
			t.Error("no denial counted for the authorization")
		}
		// tunmeshctl authz says the same, with the agents' code.
		for from, verdict := range map[string]string{m.ns(y) + "/a": "ALLOWED (ingress authorization", m.ns(y) + "/b": "DENIED (ingress authorization"} {
			out, err := exec.Command(filepath.Join(c.BinDir, "tunmeshctl"), "authz", "--kubeconfig", c.State.Kubeconfig,
				"-n", m.ns(x), "c", "--from", from, "--port", "80").CombinedOutput()
			if err != nil || !strings.Contains(string(out), verdict) || !strings.Contains(string(out), "friends-only") {
				t.Errorf("tunmeshctl authz --from %s: %v, want %q naming friends-only:\n%s", from, err, verdict, out)
			}
		}
	})
}

func ptr[T any](v T) *T { return &v }
