package netpol_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// world is one generated cluster: namespaces, pods, external addresses and
// policies, both as API objects (for the reference) and as netpol inputs.
type world struct {
	namespaces []*v1.Namespace
	pods       []*v1.Pod
	podIPs     [][]string // per pod: IPv4, IPv6
	policies   []*networkingv1.NetworkPolicy
}

var (
	genNamespaces = []string{"x", "y", "z"}
	// genUnknownNS holds pods but is not in the namespace list: upstream's
	// lister does not know it, nor does our NamespaceSource.
	genUnknownNS  = "w"
	genLabelKeys  = []string{"pod", "app", "team"}
	genLabelVals  = []string{"a", "b", "c"}
	genNSKeys     = []string{"ns", "env", "team"}
	genPortNames  = []string{"http", "dns", "metrics", "serve-80"}
	genPortNums   = []int32{53, 80, 81, 443, 8080}
	genExternal   = []string{"192.168.1.5", "10.0.1.200", "203.0.113.7", "2001:db8::1", "fd00::1:99"}
	genCIDRs      = []string{"10.0.0.0/16", "10.0.1.0/24", "10.0.2.0/24", "192.168.0.0/16", "0.0.0.0/0", "fd00::/16", "fd00::1:0/112", "::/0", "10.0.1.1/32", "10.0.0.0/8"}
	genExceptsFor = map[string][]string{
		"10.0.0.0/16":    {"10.0.1.0/24", "10.0.2.0/25", "10.0.3.1/32"},
		"10.0.0.0/8":     {"10.0.1.0/24", "10.0.0.0/16"},
		"192.168.0.0/16": {"192.168.1.0/24"},
		"0.0.0.0/0":      {"10.0.0.0/8", "192.168.1.5/32"},
		"fd00::/16":      {"fd00::1:0/112", "fd00::2:1/128"},
		"::/0":           {"fd00::/16"},
	}
)

func genLabels(r *rand.Rand, keys []string) map[string]string {
	l := map[string]string{}
	for _, k := range keys {
		if r.IntN(3) > 0 {
			l[k] = genLabelVals[r.IntN(len(genLabelVals))]
		}
	}
	return l
}

func genSelector(r *rand.Rand, keys []string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	if r.IntN(4) == 0 {
		return s // {}: everything
	}
	for range r.IntN(3) {
		if s.MatchLabels == nil {
			s.MatchLabels = map[string]string{}
		}
		s.MatchLabels[keys[r.IntN(len(keys))]] = genLabelVals[r.IntN(len(genLabelVals))]
	}
	for range r.IntN(3) {
		e := metav1.LabelSelectorRequirement{Key: keys[r.IntN(len(keys))]}
		switch r.IntN(4) {
		case 0:
			e.Operator = metav1.LabelSelectorOpIn
		case 1:
			e.Operator = metav1.LabelSelectorOpNotIn
		case 2:
			e.Operator = metav1.LabelSelectorOpExists
		case 3:
			e.Operator = metav1.LabelSelectorOpDoesNotExist
		}
		if e.Operator == metav1.LabelSelectorOpIn || e.Operator == metav1.LabelSelectorOpNotIn {
			for range 1 + r.IntN(2) {
				e.Values = append(e.Values, genLabelVals[r.IntN(len(genLabelVals))])
			}
		}
		s.MatchExpressions = append(s.MatchExpressions, e)
	}
	return s
}

func genProtocol(r *rand.Rand) v1.Protocol {
	if r.IntN(4) == 0 {
		return v1.ProtocolUDP
	}
	return v1.ProtocolTCP
}

func genPorts(r *rand.Rand) []networkingv1.NetworkPolicyPort {
	if r.IntN(3) == 0 {
		return nil
	}
	var out []networkingv1.NetworkPolicyPort
	for range 1 + r.IntN(3) {
		var p networkingv1.NetworkPolicyPort
		if r.IntN(3) > 0 {
			proto := genProtocol(r)
			p.Protocol = &proto
		}
		switch r.IntN(5) {
		case 0: // every port of the protocol
		case 1, 2:
			n := genPortNums[r.IntN(len(genPortNums))]
			p.Port = &intstr.IntOrString{Type: intstr.Int, IntVal: n}
			if r.IntN(3) == 0 {
				end := n + int32(r.IntN(500))
				p.EndPort = &end
			}
		default:
			p.Port = &intstr.IntOrString{Type: intstr.String, StrVal: genPortNames[r.IntN(len(genPortNames))]}
		}
		out = append(out, p)
	}
	return out
}

func genPeers(r *rand.Rand) []networkingv1.NetworkPolicyPeer {
	if r.IntN(4) == 0 {
		return nil
	}
	var out []networkingv1.NetworkPolicyPeer
	for range 1 + r.IntN(3) {
		var p networkingv1.NetworkPolicyPeer
		switch r.IntN(4) {
		case 0:
			cidr := genCIDRs[r.IntN(len(genCIDRs))]
			p.IPBlock = &networkingv1.IPBlock{CIDR: cidr}
			for _, e := range genExceptsFor[cidr] {
				if r.IntN(2) == 0 {
					p.IPBlock.Except = append(p.IPBlock.Except, e)
				}
			}
		case 1:
			p.PodSelector = genSelector(r, genLabelKeys)
		case 2:
			p.NamespaceSelector = genSelector(r, genNSKeys)
		case 3:
			p.PodSelector = genSelector(r, genLabelKeys)
			p.NamespaceSelector = genSelector(r, genNSKeys)
		}
		out = append(out, p)
	}
	return out
}

func genWorld(r *rand.Rand) world {
	var w world
	for _, name := range genNamespaces {
		l := genLabels(r, genNSKeys)
		l[v1.LabelMetadataName] = name
		w.namespaces = append(w.namespaces, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}})
	}
	for ni, ns := range append(slices.Clone(genNamespaces), genUnknownNS) {
		for i := range 1 + r.IntN(3) {
			pod := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("p%d", i), Labels: genLabels(r, genLabelKeys)}}
			var ports []v1.ContainerPort
			for range r.IntN(4) {
				ports = append(ports, v1.ContainerPort{
					Name:          genPortNames[r.IntN(len(genPortNames))],
					ContainerPort: genPortNums[r.IntN(len(genPortNums))],
					Protocol:      genProtocol(r), // as defaulted by the API
				})
			}
			pod.Spec.Containers = []v1.Container{{Name: "c", Ports: ports}}
			w.pods = append(w.pods, pod)
			w.podIPs = append(w.podIPs, []string{fmt.Sprintf("10.0.%d.%d", ni, i+1), fmt.Sprintf("fd00::%d:%d", ni, i+1)})
		}
	}
	for i := range 1 + r.IntN(4) {
		ns := genNamespaces[r.IntN(len(genNamespaces))]
		if r.IntN(8) == 0 {
			ns = genUnknownNS
		}
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("np%d", i)}}
		np.Spec.PodSelector = *genSelector(r, genLabelKeys)
		switch r.IntN(4) {
		case 0:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 1:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 2:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
		// Empty rule lists stay nil, as the API server serves them
		// (omitempty); see TestReferenceEmptyRuleListQuirk.
		for range r.IntN(3) {
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{Ports: genPorts(r), From: genPeers(r)})
		}
		for range r.IntN(3) {
			np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{Ports: genPorts(r), To: genPeers(r)})
		}
		w.policies = append(w.policies, np)
	}
	return w
}

// toNetpolPod converts a pod as the agent will.
func toNetpolPod(p *v1.Pod) *netpol.Pod {
	if p == nil {
		return nil
	}
	out := &netpol.Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels}
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			out.Ports = append(out.Ports, netpol.ContainerPort{Name: cp.Name, Port: cp.ContainerPort, Protocol: cp.Protocol})
		}
	}
	return out
}

func (w world) snapshot(t testing.TB) *netpol.Snapshot {
	ns := map[string]map[string]string{}
	for _, n := range w.namespaces {
		ns[n.Name] = n.Labels
	}
	s, err := netpol.NewSnapshot(w.policies, ns)
	if err != nil {
		t.Fatalf("generated policies do not compile: %v", err)
	}
	return s
}

// TestDifferentialKubeNetworkPolicies compares Egress and Ingress with
// kube-network-policies' evaluator on generated clusters and connections:
// random selectors (all operators), policy types, ports (numbers, ranges,
// names, protocols), named container ports, ipBlocks with except (IPv4 and
// IPv6), pod and external peers, and a namespace the listers do not know.
func TestDifferentialKubeNetworkPolicies(t *testing.T) {
	const worlds, connsPerWorld = 1500, 12
	start := time.Now()
	r := rand.New(rand.NewPCG(11, 2026))
	var cases, allowedEg, allowedIn, byPolicy int
	for wi := range worlds {
		w := genWorld(r)
		ref := newReference(t, w.policies, w.namespaces)
		ev, err := netpol.New(w.snapshot(t), w.snapshot(t))
		if err != nil {
			t.Fatal(err)
		}
		for range connsPerWorld {
			si, di := r.IntN(len(w.pods)+1)-1, r.IntN(len(w.pods)+1)-1
			family := r.IntN(2)
			var srcPod, dstPod *v1.Pod
			var srcIP, dstIP string
			if si < 0 {
				srcIP = genExternal[r.IntN(len(genExternal))]
			} else {
				srcPod, srcIP = w.pods[si], w.podIPs[si][family]
			}
			if di < 0 {
				dstIP = genExternal[r.IntN(len(genExternal))]
			} else {
				dstPod, dstIP = w.pods[di], w.podIPs[di][family]
			}
			port := genPortNums[r.IntN(len(genPortNums))]
			if r.IntN(4) == 0 {
				port = 1 + int32(r.IntN(9000))
			}
			proto := genProtocol(r)
			c := netpol.Conn{
				Src:      netpol.Endpoint{IP: netip.MustParseAddr(srcIP), Pod: toNetpolPod(srcPod)},
				Dst:      netpol.Endpoint{IP: netip.MustParseAddr(dstIP), Pod: toNetpolPod(dstPod)},
				Port:     port,
				Protocol: proto,
			}
			eg, in := ev.Egress(c), ev.Ingress(c)
			wantEg := ref.egress(t, srcPod, dstPod, dstIP, int(port), proto)
			wantIn := ref.ingress(t, srcPod, srcIP, dstPod, int(port), proto)
			if eg.Allowed != wantEg || in.Allowed != wantIn {
				t.Fatalf("world %d: %s -> %s:%d/%s: egress %v (%s), ingress %v (%s); reference egress %v, ingress %v\n%s",
					wi, srcIP, dstIP, port, proto, eg.Allowed, eg, in.Allowed, in, wantEg, wantIn, dump(w))
			}
			checkVerdict(t, eg)
			checkVerdict(t, in)
			cases++
			if wantEg {
				allowedEg++
			}
			if wantIn {
				allowedIn++
			}
			if eg.Reason == netpol.ReasonAllowedByPolicy || in.Reason == netpol.ReasonAllowedByPolicy {
				byPolicy++
			}
		}
	}
	// The generator must exercise both outcomes in quantity, or agreement
	// means little.
	t.Logf("%d connections in %v: egress allowed %d, ingress allowed %d, allowed by a policy rule %d",
		cases, time.Since(start).Round(time.Millisecond), allowedEg, allowedIn, byPolicy)
	for name, n := range map[string]int{"egress allowed": allowedEg, "egress denied": cases - allowedEg,
		"ingress allowed": allowedIn, "ingress denied": cases - allowedIn, "allowed by a rule": byPolicy} {
		if n < cases/20 {
			t.Errorf("only %d of %d cases %s: generator too narrow", n, cases, name)
		}
	}
}

// checkVerdict checks a verdict's internal consistency.
func checkVerdict(t testing.TB, v netpol.Verdict) {
	t.Helper()
	switch v.Reason {
	case netpol.ReasonNotIsolated:
		if !v.Allowed || len(v.Isolating) > 0 || v.Policy != "" {
			t.Fatalf("inconsistent verdict %+v", v)
		}
	case netpol.ReasonAllowedByPolicy:
		if !v.Allowed || !slices.Contains(v.Isolating, v.Policy) || v.Rule < 0 {
			t.Fatalf("inconsistent verdict %+v", v)
		}
	case netpol.ReasonDefaultDeny:
		if v.Allowed || len(v.Isolating) == 0 || v.Policy != "" {
			t.Fatalf("inconsistent verdict %+v", v)
		}
	default:
		t.Fatalf("unknown reason in %+v", v)
	}
}

func dump(w world) string {
	s := ""
	for _, n := range w.namespaces {
		s += fmt.Sprintf("namespace %s %v\n", n.Name, n.Labels)
	}
	for i, p := range w.pods {
		s += fmt.Sprintf("pod %s/%s %v %v ports %v\n", p.Namespace, p.Name, w.podIPs[i], p.Labels, p.Spec.Containers[0].Ports)
	}
	for _, np := range w.policies {
		s += fmt.Sprintf("policy %s/%s %+v\n", np.Namespace, np.Name, np.Spec)
	}
	return s
}
