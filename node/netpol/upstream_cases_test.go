package netpol_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// The upstream Kubernetes NetworkPolicy e2e model (test/e2e/network/netpol):
// namespaces x, y, z labelled kubernetes.io/metadata.name, each with pods a,
// b, c labelled pod=<name>, every pod serving 80 and 81 on TCP and UDP with
// container ports named serve-<port>-<tcp|udp>. Each case below restates one
// upstream test: its policies and its expected reachability matrix, built
// the way upstream builds it (start from all-allowed, then
// Expect/ExpectPeer/ExpectAllIngress edits), over the full 9x9 model,
// self-connections included. The matrix is checked with Decide (egress of
// the client, then ingress of the server), as the two agents apply it, and
// against kube-network-policies' evaluator.
var (
	modelNamespaces = []string{"x", "y", "z"}
	modelPods       = []string{"a", "b", "c"}
)

const nsLabel = "kubernetes.io/metadata.name"

type modelPod struct{ ns, name string }

func (p modelPod) String() string { return p.ns + "/" + p.name }

func allModelPods() []modelPod {
	var out []modelPod
	for _, ns := range modelNamespaces {
		for _, n := range modelPods {
			out = append(out, modelPod{ns, n})
		}
	}
	return out
}

// matrix is an expected reachability: from -> to -> allowed.
type matrix map[modelPod]map[modelPod]bool

func newMatrix(def bool) matrix {
	m := matrix{}
	for _, f := range allModelPods() {
		m[f] = map[modelPod]bool{}
		for _, t := range allModelPods() {
			m[f][t] = def
		}
	}
	return m
}

func (m matrix) expect(from, to modelPod, v bool) { m[from][to] = v }

// expectPeer sets every pair whose ends match the peers; an empty namespace
// or name matches any.
func (m matrix) expectPeer(fromNS, fromPod, toNS, toPod string, v bool) {
	match := func(p modelPod, ns, name string) bool {
		return (ns == "" || p.ns == ns) && (name == "" || p.name == name)
	}
	for f := range m {
		for t := range m[f] {
			if match(f, fromNS, fromPod) && match(t, toNS, toPod) {
				m[f][t] = v
			}
		}
	}
}

func (m matrix) expectAllIngress(to modelPod, v bool) {
	for f := range m {
		m[f][to] = v
	}
}

type modelCluster struct {
	namespaces map[string]map[string]string
	podLabels  map[modelPod]map[string]string // extra pod labels
}

func newModelCluster() modelCluster {
	c := modelCluster{namespaces: map[string]map[string]string{}, podLabels: map[modelPod]map[string]string{}}
	for _, ns := range modelNamespaces {
		c.namespaces[ns] = map[string]string{nsLabel: ns}
	}
	return c
}

func (c modelCluster) endpoint(p modelPod) netpol.Endpoint {
	pod := &netpol.Pod{Namespace: p.ns, Name: p.name, Labels: map[string]string{"pod": p.name}}
	for k, v := range c.podLabels[p] {
		pod.Labels[k] = v
	}
	for _, port := range []int32{80, 81} {
		for _, proto := range []v1.Protocol{v1.ProtocolTCP, v1.ProtocolUDP} {
			pod.Ports = append(pod.Ports, netpol.ContainerPort{
				Name: fmt.Sprintf("serve-%d-%s", port, strings.ToLower(string(proto))), Port: port, Protocol: proto,
			})
		}
	}
	nsi := strings.Index("xyz", p.ns)
	pi := strings.Index("abc", p.name)
	return netpol.Endpoint{IP: netip.AddrFrom4([4]byte{10, 0, byte(nsi), byte(pi + 1)}), Pod: pod}
}

// check compares the evaluator's reachability on port/proto with want and
// prints both matrices on a mismatch.
func (c modelCluster) check(t *testing.T, policies []*networkingv1.NetworkPolicy, port int32, proto v1.Protocol, want matrix) {
	t.Helper()
	s, err := netpol.NewSnapshot(policies, c.namespaces)
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := netpol.New(s, s)
	var namespaces []*v1.Namespace
	for name, l := range c.namespaces {
		namespaces = append(namespaces, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}})
	}
	ref := newReference(t, policies, namespaces)
	got := newMatrix(false)
	wrong := 0
	for _, f := range allModelPods() {
		for _, to := range allModelPods() {
			src, dst := c.endpoint(f), c.endpoint(to)
			v := ev.Decide(netpol.Conn{Src: src, Dst: dst, Port: port, Protocol: proto})
			got[f][to] = v.Allowed
			if v.Allowed != want[f][to] {
				wrong++
				t.Errorf("%s -> %s:%d/%s: %s, want allowed=%v", f, to, port, proto, v, want[f][to])
			}
			// The matrices are also the reference's answers.
			srcPod, dstPod := toV1Pod(src.Pod), toV1Pod(dst.Pod)
			refAllowed := ref.egress(t, srcPod, dstPod, dst.IP.String(), int(port), proto) &&
				ref.ingress(t, srcPod, src.IP.String(), dstPod, int(port), proto)
			if refAllowed != want[f][to] {
				t.Errorf("%s -> %s:%d/%s: reference allowed=%v, want %v", f, to, port, proto, refAllowed, want[f][to])
			}
		}
	}
	if wrong > 0 {
		t.Errorf("port %d/%s: %d wrong\nwant:\n%s\ngot:\n%s", port, proto, wrong, want, got)
	}
}

func toV1Pod(p *netpol.Pod) *v1.Pod {
	out := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels}}
	c := v1.Container{Name: "c"}
	for _, cp := range p.Ports {
		c.Ports = append(c.Ports, v1.ContainerPort{Name: cp.Name, ContainerPort: cp.Port, Protocol: cp.Protocol})
	}
	out.Spec.Containers = []v1.Container{c}
	return out
}

func (m matrix) String() string {
	var b strings.Builder
	b.WriteString("      ")
	for _, to := range allModelPods() {
		b.WriteString(to.String() + " ")
	}
	b.WriteString("\n")
	for _, f := range allModelPods() {
		b.WriteString(f.String() + "   ")
		for _, to := range allModelPods() {
			if m[f][to] {
				b.WriteString(".   ")
			} else {
				b.WriteString("X   ")
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func nsIn(op metav1.LabelSelectorOperator, vals ...string) *metav1.LabelSelector {
	return expr(nsLabel, op, vals...)
}

// step is one connectivity check of a case: a port and protocol and the
// expected matrix, after the case's policies (and namespace labels) are
// replaced by those of the step when set.
type step struct {
	port       int32
	proto      v1.Protocol
	policies   []*networkingv1.NetworkPolicy  // nil: the case's
	nsLabels   map[string]map[string]string   // extra namespace labels
	podLabels  map[modelPod]map[string]string // extra pod labels
	reach      func(m matrix)
	allAllowed bool
}

func TestUpstreamE2ECases(t *testing.T) {
	x, y, z := "x", "y", "z"
	xa, xb, xc := modelPod{x, "a"}, modelPod{x, "b"}, modelPod{x, "c"}
	ya, yb := modelPod{y, "a"}, modelPod{y, "b"}
	zb := modelPod{z, "b"}
	podA := sel("pod", "a")
	tcp := v1.ProtocolTCP

	allowNSY81 := withIngress(np(x, "allow-client-a-via-ns-selector", podA), from(ports(port(tcp, 81)), nss(sel(nsLabel, y))))
	allowNSY80 := withIngress(np(x, "allow-client-a-via-ns-selector-80", podA), from(ports(port(tcp, 80)), nss(sel(nsLabel, y))))
	only81FromY := func(m matrix) {
		m.expectPeer(x, "", x, "a", false)
		m.expectPeer(y, "", x, "a", true)
		m.expectPeer(z, "", x, "a", false)
	}

	tests := []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		steps    []step
	}{
		{
			name:     "should support a 'default-deny-ingress' policy",
			policies: []*networkingv1.NetworkPolicy{np(x, "deny-ingress", all)},
			steps:    []step{{port: 80, reach: func(m matrix) { m.expectPeer("", "", x, "", false) }}},
		},
		{
			name:     "should support a 'default-deny-all' policy",
			policies: []*networkingv1.NetworkPolicy{np(x, "deny-all", all, ingress, egress)},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectPeer("", "", x, "", false)
				m.expectPeer(x, "", "", "", false)
			}}},
		},
		{
			name:     "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "x-a-allows-x-b", podA), from(nil, pods(sel("pod", "b"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, false)
				m.expect(xb, xa, true)
			}}},
		},
		{
			name: "should enforce policy to allow ingress traffic for a target",
			policies: []*networkingv1.NetworkPolicy{
				np(x, "deny-all", all),
				withIngress(np(x, "allow-all-to-a", podA), from(nil, both(all, all))),
			},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, true)
				m.expectAllIngress(xb, false)
				m.expectAllIngress(xc, false)
			}}},
		},
		{
			name:     "should enforce policy to allow ingress traffic from pods in all namespaces",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-from-another-ns", podA), from(nil, nss(sel())))},
			steps:    []step{{port: 80, allAllowed: true}},
		},
		{
			name:     "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-ns-selector", podA), from(nil, nss(sel(nsLabel, y))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectPeer(x, "", x, "a", false)
				m.expectPeer(z, "", x, "a", false)
			}}},
		},
		{
			name:     "should enforce policy based on PodSelector with MatchExpressions",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "x-a-allows-x-b", podA), from(nil, pods(expr("pod", metav1.LabelSelectorOpIn, "b"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, false)
				m.expect(xb, xa, true)
			}}},
		},
		{
			name:     "should enforce policy based on NamespaceSelector with MatchExpressions",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-match-selector", podA), from(nil, nss(nsIn(metav1.LabelSelectorOpIn, y))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectPeer(x, "", x, "a", false)
				m.expectPeer(z, "", x, "a", false)
			}}},
		},
		{
			name: "should enforce policy based on PodSelector or NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-match-selector", podA),
				from(nil, nss(nsIn(metav1.LabelSelectorOpNotIn, x)), pods(sel("pod", "b"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expect(xa, xa, false)
				m.expect(xc, xa, false)
			}}},
		},
		{
			name: "should enforce policy based on PodSelector and NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-podselector-and-nsselector", podA),
				from(nil, both(nsIn(metav1.LabelSelectorOpNotIn, x), sel("pod", "b"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, false)
				m.expect(yb, xa, true)
				m.expect(zb, xa, true)
			}}},
		},
		{
			name: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-z-pod-b-c", podA),
				from(nil, both(nsIn(metav1.LabelSelectorOpNotIn, x), expr("pod", metav1.LabelSelectorOpIn, "b", "c"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectPeer(x, "", x, "a", false)
				m.expect(ya, xa, false)
				m.expect(modelPod{z, "a"}, xa, false)
			}}},
		},
		{
			name:     "should enforce policy based on any PodSelectors",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-x-pod-b-c", podA), from(nil, pods(sel("pod", "b")), pods(sel("pod", "c"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, false)
				m.expect(xb, xa, true)
				m.expect(xc, xa, true)
			}}},
		},
		{
			name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-ns-y-pod-a-via-namespace-pod-selector", podA),
				from(nil, both(sel(nsLabel, y), sel("pod", "a"))))},
			steps: []step{{port: 80, reach: func(m matrix) {
				m.expectAllIngress(xa, false)
				m.expect(ya, xa, true)
			}}},
		},
		{
			name:     "should enforce policy based on Ports",
			policies: []*networkingv1.NetworkPolicy{allowNSY81},
			steps:    []step{{port: 81, reach: only81FromY}},
		},
		{
			name:     "should enforce multiple, stacked policies with overlapping podSelectors",
			policies: []*networkingv1.NetworkPolicy{allowNSY81},
			steps: []step{
				{port: 81, reach: only81FromY},
				{port: 80, reach: func(m matrix) { m.expectAllIngress(xa, false) }},
				{port: 80, policies: []*networkingv1.NetworkPolicy{allowNSY81, allowNSY80}, reach: only81FromY},
			},
		},
		{
			name:     "should support allow-all policy",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-all", sel()), from(nil))},
			steps:    []step{{port: 80, allAllowed: true}, {port: 81, allAllowed: true}},
		},
		{
			name:     "should allow ingress access on one named port",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-all", sel()), from(ports(port("", "serve-81-tcp"))))},
			steps: []step{
				{port: 81, allAllowed: true},
				{port: 80, reach: func(m matrix) { m.expectPeer("", "", x, "", false) }},
			},
		},
		{
			name: "should allow ingress access from namespace on one named port",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-ns-selector-80", podA),
				from(ports(port(tcp, "serve-80-tcp")), nss(sel(nsLabel, y))))},
			steps: []step{
				{port: 80, reach: func(m matrix) {
					m.expectPeer(x, "", x, "a", false)
					m.expectPeer(z, "", x, "a", false)
				}},
				{port: 81, reach: func(m matrix) { m.expectAllIngress(xa, false) }},
			},
		},
		{
			name:     "should allow egress access on one named port",
			policies: []*networkingv1.NetworkPolicy{withEgress(np(x, "allow-egress", sel(), egress), to(ports(port("", "serve-80-tcp"))))},
			steps: []step{
				{port: 80, allAllowed: true},
				{port: 81, reach: func(m matrix) { m.expectPeer(x, "", "", "", false) }},
			},
		},
		{
			name:     "should enforce updated policy",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-all-mutate-to-deny-all", sel()), from(nil))},
			steps: []step{
				{port: 81, allAllowed: true},
				{port: 81, policies: []*networkingv1.NetworkPolicy{np(x, "allow-all-mutate-to-deny-all", sel(), ingress)},
					reach: func(m matrix) { m.expectPeer("", "", x, "", false) }},
			},
		},
		{
			name:     "should allow ingress access from updated namespace",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-ns-selector", podA), from(nil, nss(sel("ns2", "updated"))))},
			steps: []step{
				{port: 80, reach: func(m matrix) { m.expectAllIngress(xa, false) }},
				{port: 80, nsLabels: map[string]map[string]string{y: {"ns2": "updated"}}, reach: func(m matrix) {
					m.expectAllIngress(xa, false)
					m.expectPeer(y, "", "", "", true)
				}},
			},
		},
		{
			name:     "should allow ingress access from updated pod",
			policies: []*networkingv1.NetworkPolicy{withIngress(np(x, "allow-client-a-via-pod-selector", podA), from(nil, pods(sel("pod2", "updated"))))},
			steps: []step{
				{port: 80, reach: func(m matrix) { m.expectAllIngress(xa, false) }},
				{port: 80, podLabels: map[modelPod]map[string]string{xb: {"pod2": "updated"}}, reach: func(m matrix) {
					m.expectAllIngress(xa, false)
					m.expect(xb, xa, true)
				}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i, st := range tt.steps {
				t.Run(fmt.Sprintf("step%d-port%d", i, st.port), func(t *testing.T) {
					c := newModelCluster()
					for ns, l := range st.nsLabels {
						for k, v := range l {
							c.namespaces[ns][k] = v
						}
					}
					c.podLabels = st.podLabels
					policies := tt.policies
					if st.policies != nil {
						policies = st.policies
					}
					want := newMatrix(true)
					if !st.allAllowed {
						st.reach(want)
					}
					proto := st.proto
					if proto == "" {
						proto = v1.ProtocolTCP
					}
					c.check(t, policies, st.port, proto, want)
				})
			}
		})
	}
}
