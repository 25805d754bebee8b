package netpol_test

import (
	"errors"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// The table's cluster: namespaces x (env=prod), y and z (env=dev), and w,
// which holds a pod but is unknown to the NamespaceSource.
var (
	tableNamespaces = map[string]map[string]string{
		"x": {"kubernetes.io/metadata.name": "x", "ns": "x", "env": "prod"},
		"y": {"kubernetes.io/metadata.name": "y", "ns": "y", "env": "dev"},
		"z": {"kubernetes.io/metadata.name": "z", "ns": "z", "env": "dev"},
	}
	tablePods = map[string]struct {
		pod    *netpol.Pod
		v4, v6 string
	}{
		"x/a": {&netpol.Pod{Namespace: "x", Name: "a", Labels: map[string]string{"pod": "a", "app": "web"}, Ports: []netpol.ContainerPort{
			{Name: "http", Port: 80}, {Name: "dns", Port: 53, Protocol: v1.ProtocolUDP}, {Name: "metrics", Port: 9090, Protocol: v1.ProtocolTCP},
		}}, "10.0.0.1", "fd00::1"},
		"x/b": {&netpol.Pod{Namespace: "x", Name: "b", Labels: map[string]string{"pod": "b"}}, "10.0.0.2", "fd00::2"},
		"y/a": {&netpol.Pod{Namespace: "y", Name: "a", Labels: map[string]string{"pod": "a"}}, "10.0.1.1", "fd00::1:1"},
		"y/b": {&netpol.Pod{Namespace: "y", Name: "b", Labels: map[string]string{"pod": "b"}}, "10.0.1.2", "fd00::1:2"},
		"z/c": {&netpol.Pod{Namespace: "z", Name: "c", Labels: map[string]string{"pod": "c", "app": "web"}, Ports: []netpol.ContainerPort{
			{Name: "http", Port: 8080},
		}}, "10.0.2.3", "fd00::2:3"},
		"w/d": {&netpol.Pod{Namespace: "w", Name: "d", Labels: map[string]string{"pod": "d"}}, "10.0.3.4", "fd00::3:4"},
	}
)

// end is a pod ("x/a", IPv4 unless suffixed "@6") or a bare IP.
func end(t *testing.T, s string) netpol.Endpoint {
	t.Helper()
	name, six := strings.CutSuffix(s, "@6")
	if p, ok := tablePods[name]; ok {
		ip := p.v4
		if six {
			ip = p.v6
		}
		return netpol.Endpoint{IP: netip.MustParseAddr(ip), Pod: p.pod}
	}
	return netpol.Endpoint{IP: netip.MustParseAddr(s)}
}

func sel(kv ...string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{MatchLabels: map[string]string{}}
	for i := 0; i+1 < len(kv); i += 2 {
		s.MatchLabels[kv[i]] = kv[i+1]
	}
	return s
}

func expr(key string, op metav1.LabelSelectorOperator, vals ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: key, Operator: op, Values: vals}}}
}

func np(ns, name string, podSel *metav1.LabelSelector, types ...networkingv1.PolicyType) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       networkingv1.NetworkPolicySpec{PodSelector: *podSel, PolicyTypes: types},
	}
}

func withIngress(p *networkingv1.NetworkPolicy, rules ...networkingv1.NetworkPolicyIngressRule) *networkingv1.NetworkPolicy {
	p.Spec.Ingress = append(p.Spec.Ingress, rules...)
	return p
}

func withEgress(p *networkingv1.NetworkPolicy, rules ...networkingv1.NetworkPolicyEgressRule) *networkingv1.NetworkPolicy {
	p.Spec.Egress = append(p.Spec.Egress, rules...)
	return p
}

func from(ports []networkingv1.NetworkPolicyPort, peers ...networkingv1.NetworkPolicyPeer) networkingv1.NetworkPolicyIngressRule {
	return networkingv1.NetworkPolicyIngressRule{Ports: ports, From: peers}
}

func to(ports []networkingv1.NetworkPolicyPort, peers ...networkingv1.NetworkPolicyPeer) networkingv1.NetworkPolicyEgressRule {
	return networkingv1.NetworkPolicyEgressRule{Ports: ports, To: peers}
}

func pods(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: s}
}

func nss(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: s}
}

func both(ns, pod *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: ns, PodSelector: pod}
}

func block(cidr string, except ...string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr, Except: except}}
}

// port builds a port entry: proto "" leaves the protocol unset; n is an int,
// a name (string) or nil.
func port(proto v1.Protocol, n any, endPort ...int32) networkingv1.NetworkPolicyPort {
	var p networkingv1.NetworkPolicyPort
	if proto != "" {
		p.Protocol = &proto
	}
	switch n := n.(type) {
	case int:
		v := intstr.FromInt32(int32(n))
		p.Port = &v
	case string:
		v := intstr.FromString(n)
		p.Port = &v
	}
	if len(endPort) > 0 {
		p.EndPort = &endPort[0]
	}
	return p
}

func ports(p ...networkingv1.NetworkPolicyPort) []networkingv1.NetworkPolicyPort { return p }

const (
	ingress = networkingv1.PolicyTypeIngress
	egress  = networkingv1.PolicyTypeEgress
)

var all = &metav1.LabelSelector{}

// check is one connection and its expected verdict per direction: "allow"
// (not isolated), "allow:ns/name:rule", or "deny:ns/a,ns/b" (the isolating
// policies, in name order).
type check struct {
	src, dst string
	port     int32
	proto    v1.Protocol
	egress   string
	ingress  string
}

func TestEvaluate(t *testing.T) {
	tests := []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		checks   []check
	}{
		{
			name:   "no policies allow everything",
			checks: []check{{src: "x/a", dst: "y/b", port: 80, egress: "allow", ingress: "allow"}},
		},
		{
			name:     "empty podSelector default-denies ingress for every pod of the namespace only",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny", all)},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/deny"},
				{src: "x/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/deny"},
				{src: "x/a", dst: "y/a", port: 80, egress: "allow", ingress: "allow"},
			},
		},
		{
			name:     "podSelector picks the isolated pods",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-a", sel("pod", "a"))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/deny-a"},
				{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "allow"},
			},
		},
		{
			name:     "a rule with no from and no ports allows all",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "open", all), from(nil))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/open:0"},
				{src: "192.168.1.5", dst: "x/a", port: 5, proto: v1.ProtocolUDP, egress: "allow", ingress: "allow:x/open:0"},
			},
		},
		{
			name:     "empty from allows all peers on the listed ports only",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "web", all), from(ports(port("", 80))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/web:0"},
				{src: "192.168.1.5", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/web:0"},
				{src: "y/a", dst: "x/a", port: 81, egress: "allow", ingress: "deny:x/web"},
			},
		},
		{
			name:     "podSelector peer alone means the policy's namespace",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "from-b", all), from(nil, pods(sel("pod", "b"))))},
			checks: []check{
				{src: "x/b", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/from-b:0"},
				{src: "y/b", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/from-b"},
				{src: "x/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/from-b"},
			},
		},
		{
			name:     "empty podSelector peer means every pod of the policy's namespace",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "same-ns", all), from(nil, pods(all)))},
			checks: []check{
				{src: "x/b", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/same-ns:0"},
				{src: "y/b", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/same-ns"},
			},
		},
		{
			name:     "namespaceSelector alone means every pod of the selected namespaces",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "from-dev", all), from(nil, nss(sel("env", "dev"))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/from-dev:0"},
				{src: "z/c", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/from-dev:0"},
				{src: "x/b", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/from-dev"},
				{src: "w/d", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/from-dev"},
			},
		},
		{
			name:     "empty namespaceSelector selects every pod, even of an unknown namespace, but no external IP",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "pods", all), from(nil, nss(all)))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/pods:0"},
				{src: "w/d", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/pods:0"},
				{src: "192.168.1.5", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/pods"},
			},
		},
		{
			name:     "a non-empty namespaceSelector needs a known namespace, even with DoesNotExist",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "no-team", all), from(nil, nss(expr("team", metav1.LabelSelectorOpDoesNotExist))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/no-team:0"},
				{src: "w/d", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/no-team"},
			},
		},
		{
			name:     "namespaceSelector and podSelector in one peer are ANDed",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "and", all), from(nil, both(sel("ns", "y"), sel("pod", "b"))))},
			checks: []check{
				{src: "y/b", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/and:0"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/and"},
				{src: "x/b", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/and"},
			},
		},
		{
			name:     "two peers are ORed",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "or", all), from(nil, nss(sel("ns", "y")), pods(sel("pod", "b"))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/or:0"},
				{src: "x/b", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/or:0"},
				{src: "z/c", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/or"},
			},
		},
		{
			name: "matchExpressions In, NotIn, Exists, DoesNotExist",
			policies: []*networkingv1.NetworkPolicy{
				np("x", "no-app", expr("app", metav1.LabelSelectorOpDoesNotExist)),
				withIngress(np("z", "exprs", expr("app", metav1.LabelSelectorOpExists)),
					from(nil, both(expr("env", metav1.LabelSelectorOpNotIn, "prod"), expr("pod", metav1.LabelSelectorOpIn, "a", "c")))),
			},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow"},
				{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/no-app"},
				{src: "y/a", dst: "z/c", port: 80, egress: "allow", ingress: "allow:z/exprs:0"},
				{src: "z/c", dst: "z/c", port: 80, egress: "allow", ingress: "allow:z/exprs:0"},
				{src: "y/b", dst: "z/c", port: 80, egress: "allow", ingress: "deny:z/exprs"},
				{src: "x/a", dst: "z/c", port: 80, egress: "allow", ingress: "deny:z/exprs"},
			},
		},
		{
			name:     "ipBlock with except, IPv4",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "cidr", all), from(nil, block("192.168.0.0/16", "192.168.1.0/24", "192.168.2.7/32")))},
			checks: []check{
				{src: "192.168.3.1", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/cidr:0"},
				{src: "192.168.1.5", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/cidr"},
				{src: "192.168.2.7", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/cidr"},
				{src: "192.168.2.8", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/cidr:0"},
				{src: "10.1.0.1", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/cidr"},
				{src: "2001:db8::1", dst: "x/a@6", port: 80, egress: "allow", ingress: "deny:x/cidr"},
			},
		},
		{
			name:     "ipBlock with except, IPv6, host bits masked",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "cidr6", all), from(nil, block("2001:db8::1/32", "2001:db8:1::/48")))},
			checks: []check{
				{src: "2001:db8::5", dst: "x/a@6", port: 80, egress: "allow", ingress: "allow:x/cidr6:0"},
				{src: "2001:db8:1::5", dst: "x/a@6", port: 80, egress: "allow", ingress: "deny:x/cidr6"},
				{src: "2001:db9::5", dst: "x/a@6", port: 80, egress: "allow", ingress: "deny:x/cidr6"},
				{src: "192.168.3.1", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/cidr6"},
			},
		},
		{
			name:     "ipBlock matches a pod's IP too",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "pod-cidr", all), from(nil, block("10.0.1.0/24"), block("fd00::1:0/112", "fd00::1:2/128")))},
			checks: []check{
				{src: "y/b", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/pod-cidr:0"},
				{src: "y/a@6", dst: "x/a@6", port: 80, egress: "allow", ingress: "allow:x/pod-cidr:0"},
				{src: "y/b@6", dst: "x/a@6", port: 80, egress: "allow", ingress: "deny:x/pod-cidr"},
				{src: "z/c", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/pod-cidr"},
			},
		},
		{
			name: "named port resolves on the destination pod's containers",
			policies: []*networkingv1.NetworkPolicy{
				withIngress(np("x", "http", all), from(ports(port("", "http")))),
				withIngress(np("z", "http", all), from(ports(port(v1.ProtocolTCP, "http")))),
			},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/http:0"},
				{src: "y/a", dst: "x/a", port: 8080, egress: "allow", ingress: "deny:x/http"},
				{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/http"},
				{src: "y/a", dst: "z/c", port: 8080, egress: "allow", ingress: "allow:z/http:0"},
				{src: "y/a", dst: "z/c", port: 80, egress: "allow", ingress: "deny:z/http"},
			},
		},
		{
			name: "named port matches per protocol",
			policies: []*networkingv1.NetworkPolicy{
				withIngress(np("x", "dns-tcp", all), from(ports(port("", "dns")))),
				withIngress(np("x", "dns-udp", sel("pod", "a")), from(ports(port(v1.ProtocolUDP, "dns")))),
			},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 53, egress: "allow", ingress: "deny:x/dns-tcp,x/dns-udp"},
				{src: "y/a", dst: "x/a", port: 53, proto: v1.ProtocolUDP, egress: "allow", ingress: "allow:x/dns-udp:0"},
				{src: "y/a", dst: "x/a", port: 9090, proto: v1.ProtocolUDP, egress: "allow", ingress: "deny:x/dns-tcp,x/dns-udp"},
			},
		},
		{
			name:     "endPort range is inclusive",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "range", all), from(ports(port(v1.ProtocolTCP, 8000, 9000))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 7999, egress: "allow", ingress: "deny:x/range"},
				{src: "y/a", dst: "x/a", port: 8000, egress: "allow", ingress: "allow:x/range:0"},
				{src: "y/a", dst: "x/a", port: 8080, egress: "allow", ingress: "allow:x/range:0"},
				{src: "y/a", dst: "x/a", port: 9000, egress: "allow", ingress: "allow:x/range:0"},
				{src: "y/a", dst: "x/a", port: 9001, egress: "allow", ingress: "deny:x/range"},
			},
		},
		{
			name: "protocol defaults to TCP; a port entry without port allows every port of its protocol",
			policies: []*networkingv1.NetworkPolicy{
				withIngress(np("x", "p80", all), from(ports(port("", 80)))),
				withIngress(np("x", "udp", all), from(ports(port(v1.ProtocolUDP, nil)))),
			},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/p80:0"},
				{src: "y/a", dst: "x/a", port: 80, proto: v1.ProtocolSCTP, egress: "allow", ingress: "deny:x/p80,x/udp"},
				{src: "y/a", dst: "x/a", port: 81, proto: v1.ProtocolUDP, egress: "allow", ingress: "allow:x/udp:0"},
				{src: "y/a", dst: "x/a", port: 81, egress: "allow", ingress: "deny:x/p80,x/udp"},
			},
		},
		{
			name: "policies are a union; the first allowing one is named, all isolating ones listed",
			policies: []*networkingv1.NetworkPolicy{
				withIngress(np("x", "b-from-y", all), from(nil, nss(sel("ns", "y")))),
				withIngress(np("x", "a-port-80", all), from(ports(port("", 80)))),
				np("x", "c-deny", all),
			},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 81, egress: "allow", ingress: "allow:x/b-from-y:0"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/a-port-80:0"},
				{src: "z/c", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/a-port-80:0"},
				{src: "z/c", dst: "x/a", port: 81, egress: "allow", ingress: "deny:x/a-port-80,x/b-from-y,x/c-deny"},
			},
		},
		{
			name:     "rule index names the matching rule",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "rules", all), from(ports(port("", 80)), nss(sel("ns", "z"))), from(ports(port("", 81))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 81, egress: "allow", ingress: "allow:x/rules:1"},
				{src: "z/c", dst: "x/a", port: 80, egress: "allow", ingress: "allow:x/rules:0"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/rules"},
			},
		},
		{
			name:     "explicit policyTypes Egress ignores ingress rules and isolates egress",
			policies: []*networkingv1.NetworkPolicy{withIngress(np("x", "eg-only", all, egress), from(nil, nss(sel("ns", "none"))))},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow"},
				{src: "x/a", dst: "y/a", port: 80, egress: "deny:x/eg-only", ingress: "allow"},
				{src: "x/a", dst: "192.168.1.5", port: 80, egress: "deny:x/eg-only", ingress: "allow"},
			},
		},
		{
			name:     "explicit policyTypes Ingress ignores egress rules",
			policies: []*networkingv1.NetworkPolicy{withEgress(np("x", "in-only", all, ingress), to(nil))},
			checks: []check{
				{src: "x/a", dst: "y/a", port: 80, egress: "allow", ingress: "allow"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/in-only"},
			},
		},
		{
			name:     "defaulted policyTypes with egress rules isolate both directions",
			policies: []*networkingv1.NetworkPolicy{withEgress(np("x", "both", all), to(ports(port("", 53))))},
			checks: []check{
				{src: "x/a", dst: "y/a", port: 53, egress: "allow:x/both:0", ingress: "allow"},
				{src: "x/a", dst: "y/a", port: 80, egress: "deny:x/both", ingress: "allow"},
				{src: "y/a", dst: "x/a", port: 53, egress: "allow", ingress: "deny:x/both"},
			},
		},
		{
			name: "egress peers: selectors, ipBlock, named port on the destination pod",
			policies: []*networkingv1.NetworkPolicy{
				withEgress(np("y", "out", sel("pod", "a"), egress),
					to(nil, both(sel("env", "dev"), sel("app", "web"))),
					to(ports(port("", "http")), nss(sel("ns", "x"))),
					to(ports(port("", 443)), block("0.0.0.0/0", "10.0.0.0/8"), block("::/0", "fd00::/8"))),
			},
			checks: []check{
				{src: "y/a", dst: "z/c", port: 1234, egress: "allow:y/out:0", ingress: "allow"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow:y/out:1", ingress: "allow"},
				{src: "y/a", dst: "x/a", port: 81, egress: "deny:y/out", ingress: "allow"},
				{src: "y/a", dst: "x/b", port: 80, egress: "deny:y/out", ingress: "allow"},
				{src: "y/a", dst: "192.168.1.5", port: 443, egress: "allow:y/out:2", ingress: "allow"},
				{src: "y/a", dst: "10.9.9.9", port: 443, egress: "deny:y/out", ingress: "allow"},
				{src: "y/a@6", dst: "2001:db8::1", port: 443, egress: "allow:y/out:2", ingress: "allow"},
				{src: "y/a@6", dst: "fd00::2:3", port: 443, egress: "deny:y/out", ingress: "allow"},
				{src: "y/b", dst: "x/b", port: 80, egress: "allow", ingress: "allow"},
			},
		},
		{
			name:     "a named port never matches a non-pod destination",
			policies: []*networkingv1.NetworkPolicy{withEgress(np("y", "named-out", all, egress), to(ports(port("", "http"))))},
			checks: []check{
				{src: "y/a", dst: "192.168.1.5", port: 80, egress: "deny:y/named-out", ingress: "allow"},
				{src: "y/a", dst: "x/a", port: 80, egress: "allow:y/named-out:0", ingress: "allow"},
			},
		},
		{
			name:     "a non-pod source is not subject to egress policy",
			policies: []*networkingv1.NetworkPolicy{np("x", "deny-all", all, ingress, egress)},
			checks: []check{
				{src: "10.0.0.2", dst: "y/a", port: 80, egress: "allow", ingress: "allow"},
				{src: "x/b", dst: "y/a", port: 80, egress: "deny:x/deny-all", ingress: "allow"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := netpol.NewSnapshot(tt.policies, tableNamespaces)
			if err != nil {
				t.Fatalf("NewSnapshot: %v", err)
			}
			ev, err := netpol.New(s, s)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range tt.checks {
				conn := netpol.Conn{Src: end(t, c.src), Dst: end(t, c.dst), Port: c.port, Protocol: c.proto}
				eg, in := ev.Egress(conn), ev.Ingress(conn)
				if got := brief(eg); got != c.egress {
					t.Errorf("%s -> %s:%d/%s egress = %s (%s), want %s", c.src, c.dst, c.port, c.proto, got, eg, c.egress)
				}
				if got := brief(in); got != c.ingress {
					t.Errorf("%s -> %s:%d/%s ingress = %s (%s), want %s", c.src, c.dst, c.port, c.proto, got, in, c.ingress)
				}
				checkVerdict(t, eg)
				checkVerdict(t, in)
				if eg.Direction != egress || in.Direction != ingress {
					t.Errorf("directions %s, %s", eg.Direction, in.Direction)
				}
				// Decide: egress first, then ingress.
				want := in
				if !eg.Allowed {
					want = eg
				}
				if got := ev.Decide(conn); got.String() != want.String() || got.Allowed != want.Allowed {
					t.Errorf("Decide = %s, want %s", got, want)
				}
			}
		})
	}
}

// brief renders a verdict in the table's notation.
func brief(v netpol.Verdict) string {
	switch v.Reason {
	case netpol.ReasonAllowedByPolicy:
		return "allow:" + v.Policy + ":" + strconv.Itoa(v.Rule)
	case netpol.ReasonDefaultDeny:
		return "deny:" + strings.Join(v.Isolating, ",")
	}
	return "allow"
}

func TestVerdictString(t *testing.T) {
	for _, tt := range []struct {
		v    netpol.Verdict
		want string
	}{
		{netpol.Verdict{Allowed: true, Direction: ingress, Reason: netpol.ReasonNotIsolated}, "ingress allowed: no policy selects the pod"},
		{netpol.Verdict{Allowed: true, Direction: egress, Reason: netpol.ReasonAllowedByPolicy, Policy: "x/web", Rule: 2, Isolating: []string{"x/web"}}, "egress allowed by policy x/web rule 2"},
		{netpol.Verdict{Direction: ingress, Reason: netpol.ReasonDefaultDeny, Isolating: []string{"x/a", "x/b"}}, "ingress denied: default deny by policies [x/a, x/b]"},
	} {
		if got := tt.v.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
}

func TestCompileErrors(t *testing.T) {
	badSel := &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: metav1.LabelSelectorOpIn}}} // In needs values
	tests := []struct {
		name   string
		policy *networkingv1.NetworkPolicy
		want   []error
		checks []check
	}{
		{
			name:   "invalid spec.podSelector selects no pod",
			policy: np("x", "bad", badSel),
			want:   []error{netpol.ErrInvalidSelector},
			checks: []check{{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow"}},
		},
		{
			name:   "invalid peer selector matches nothing, the other peers still do",
			policy: withIngress(np("x", "bad-peer", all), from(nil, pods(badSel), both(sel("ns", "y"), badSel), nss(sel("ns", "z")))),
			want:   []error{netpol.ErrInvalidSelector, netpol.ErrInvalidSelector},
			checks: []check{
				{src: "x/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/bad-peer"},
				{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/bad-peer"},
				{src: "z/c", dst: "x/b", port: 80, egress: "allow", ingress: "allow:x/bad-peer:0"},
			},
		},
		{
			name:   "invalid CIDR and except",
			policy: withIngress(np("x", "bad-cidr", all), from(nil, block("10.0.0.0/33"), block("192.168.0.0/16", "nonsense"), block("10.0.1.0/24"))),
			want:   []error{netpol.ErrInvalidIPBlock, netpol.ErrInvalidIPBlock},
			checks: []check{
				{src: "192.168.3.3", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/bad-cidr"},
				{src: "10.0.0.9", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/bad-cidr"},
				{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "allow:x/bad-cidr:0"},
			},
		},
		{
			name:   "empty peer",
			policy: withIngress(np("x", "empty-peer", all), from(nil, networkingv1.NetworkPolicyPeer{})),
			want:   []error{netpol.ErrInvalidPeer},
			checks: []check{{src: "y/a", dst: "x/b", port: 80, egress: "allow", ingress: "deny:x/empty-peer"}},
		},
		{
			name: "invalid ports match nothing",
			policy: withIngress(np("x", "bad-ports", all), from(ports(
				port("", "http", 90), port("", 90, 80), port("", 0), port("", 70000), port("", ""), port("", 81))),
				from(ports(networkingv1.NetworkPolicyPort{EndPort: ptr(int32(99))}))),
			want: []error{netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/bad-ports"},
				{src: "y/a", dst: "x/a", port: 90, egress: "allow", ingress: "deny:x/bad-ports"},
				{src: "y/a", dst: "x/a", port: 81, egress: "allow", ingress: "allow:x/bad-ports:0"},
			},
		},
		{
			name: "protocols and port names the API rejects match nothing",
			policy: withIngress(np("x", "bad-names", all), from(ports(
				port("ICMP", 80), networkingv1.NetworkPolicyPort{Protocol: ptr(v1.Protocol(""))},
				port("", "80"), port("", "http_x"), port(v1.ProtocolTCP, "metrics")))),
			want: []error{netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort, netpol.ErrInvalidPort},
			checks: []check{
				{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "deny:x/bad-names"},
				{src: "y/a", dst: "x/a", port: 9090, egress: "allow", ingress: "allow:x/bad-names:0"},
			},
		},
		{
			name:   "unknown policy type",
			policy: np("x", "bad-type", all, "Sideways"),
			want:   []error{netpol.ErrInvalidPolicy},
			checks: []check{{src: "y/a", dst: "x/a", port: 80, egress: "allow", ingress: "allow"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := netpol.Compile(tt.policy)
			if err == nil {
				t.Fatal("Compile succeeded")
			}
			if !errors.Is(err, netpol.ErrInvalidPolicy) {
				t.Errorf("%v does not wrap ErrInvalidPolicy", err)
			}
			errs := err.(interface{ Unwrap() []error }).Unwrap()
			if len(errs) != len(tt.want) {
				t.Fatalf("%d errors, want %d: %v", len(errs), len(tt.want), err)
			}
			for i, e := range errs {
				if !errors.Is(e, tt.want[i]) || !strings.Contains(e.Error(), "x/"+tt.policy.Name) {
					t.Errorf("error %d = %v, want %v naming the policy", i, e, tt.want[i])
				}
			}
			s, serr := netpol.NewSnapshot([]*networkingv1.NetworkPolicy{tt.policy}, tableNamespaces)
			if serr == nil {
				t.Fatal("NewSnapshot did not report the compile error")
			}
			ev, err := netpol.New(s, s)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range tt.checks {
				conn := netpol.Conn{Src: end(t, c.src), Dst: end(t, c.dst), Port: c.port, Protocol: c.proto}
				if got := brief(ev.Egress(conn)); got != c.egress {
					t.Errorf("%s -> %s:%d egress = %s, want %s", c.src, c.dst, c.port, got, c.egress)
				}
				if got := brief(ev.Ingress(conn)); got != c.ingress {
					t.Errorf("%s -> %s:%d ingress = %s, want %s", c.src, c.dst, c.port, got, c.ingress)
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestCompileValid(t *testing.T) {
	p, err := netpol.Compile(withEgress(np("x", "ok", sel("pod", "a")), to(ports(port("", 80, 90)), block("fd00::/8", "fd00::1/128"))))
	if err != nil {
		t.Fatal(err)
	}
	if p.String() != "x/ok" || p.Namespace() != "x" || p.Name() != "ok" {
		t.Errorf("identity %q %q %q", p, p.Namespace(), p.Name())
	}
	if !p.HasType(ingress) || !p.HasType(egress) {
		t.Error("defaulted policy types: want Ingress and Egress")
	}
	if !p.Selects(map[string]string{"pod": "a"}) || p.Selects(map[string]string{"pod": "b"}) {
		t.Error("Selects disagrees with podSelector pod=a")
	}
}

func TestNewRejectsNilSources(t *testing.T) {
	s, _ := netpol.NewSnapshot(nil, nil)
	if _, err := netpol.New(nil, s); err == nil {
		t.Error("New(nil, s) succeeded")
	}
	if _, err := netpol.New(s, nil); err == nil {
		t.Error("New(s, nil) succeeded")
	}
}

func TestSnapshotSortsPoliciesByName(t *testing.T) {
	s, err := netpol.NewSnapshot([]*networkingv1.NetworkPolicy{np("x", "c", all), np("y", "a", all), np("x", "a", all), np("x", "b", all)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range s.Policies("x") {
		names = append(names, p.Name())
	}
	if !slices.Equal(names, []string{"a", "b", "c"}) {
		t.Errorf("x policies %v, want [a b c]", names)
	}
	if _, ok := s.NamespaceLabels("x"); ok {
		t.Error("unknown namespace reported as known")
	}
}

// TestConcurrentUse documents that an Evaluator over a Snapshot needs no
// locking by its callers (the agent's connection handlers run in parallel);
// run with -race.
func TestConcurrentUse(t *testing.T) {
	s, err := netpol.NewSnapshot([]*networkingv1.NetworkPolicy{
		withIngress(np("x", "web", all), from(ports(port("", "http")), nss(sel("env", "dev")))),
	}, tableNamespaces)
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := netpol.New(s, s)
	allowed := netpol.Conn{Src: end(t, "y/a"), Dst: end(t, "x/a"), Port: 80}
	denied := netpol.Conn{Src: end(t, "x/b"), Dst: end(t, "x/a"), Port: 80}
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				if !ev.Decide(allowed).Allowed || ev.Decide(denied).Allowed {
					errs <- "wrong verdict under concurrency"
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
}
