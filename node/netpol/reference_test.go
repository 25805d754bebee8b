package netpol_test

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	_ "unsafe" // go:linkname

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// The reference is SIG Network's kube-network-policies, pinned in go.mod.
// Its NetworkPolicy evaluator is unexported: methods of its Controller whose
// only caller is the nfqueue loop of Controller.Run, which needs nftables,
// NFQUEUE and CAP_NET_ADMIN. So the test links those methods by name from
// the real module (go:linkname is refused only for the standard library).
// The signatures below must match v0.8.0's exactly: the linker does not
// check them, so after changing the version, re-read
// pkg/networkpolicy/networkpolicy.go; TestReferenceSanity catches a gross
// mismatch.
const referenceModule = "sigs.k8s.io/kube-network-policies v0.8.0"

//go:linkname refEvaluator sigs.k8s.io/kube-network-policies/pkg/networkpolicy.(*Controller).evaluator
func refEvaluator(c *networkpolicy.Controller, ctx context.Context, networkPolicies []*networkingv1.NetworkPolicy,
	networkPolictType networkingv1.PolicyType, srcPod *v1.Pod, srcPort int, dstPod *v1.Pod, dstIP net.IP,
	dstPort int, proto v1.Protocol) bool

//go:linkname refPoliciesForPod sigs.k8s.io/kube-network-policies/pkg/networkpolicy.(*Controller).getNetworkPoliciesForPod
func refPoliciesForPod(c *networkpolicy.Controller, pod *v1.Pod) []*networkingv1.NetworkPolicy

// reference wraps upstream's evaluator as its evaluatePacket drives it for
// NetworkPolicy (AdminNetworkPolicy disabled): the source pod's egress
// policies, then, if any select it, the destination pod's ingress policies.
// A reference holds one generated cluster; they share one upstream
// Controller (its constructor starts event-broadcaster goroutines that
// cannot be stopped), whose listers' indexers are refilled when another
// reference is used.
type reference struct {
	policies   []any
	namespaces []any
	gen        uint64
}

var upstream struct {
	once       sync.Once
	err        error
	c          *networkpolicy.Controller
	policies   cache.Indexer
	namespaces cache.Indexer

	mu     sync.Mutex // guards loaded and the indexers' contents
	loaded uint64
	gens   atomic.Uint64
}

func upstreamController() (*networkpolicy.Controller, error) {
	upstream.once.Do(func() {
		client := fake.NewClientset()
		f := informers.NewSharedInformerFactory(client, 0)
		np, ns := f.Networking().V1().NetworkPolicies(), f.Core().V1().Namespaces()
		upstream.c, upstream.err = networkpolicy.NewController(client, np, ns, f.Core().V1().Pods(), f.Core().V1().Nodes(),
			nil, nil, nil, networkpolicy.Config{NodeName: "reference", NRIdisabled: true})
		upstream.policies, upstream.namespaces = np.Informer().GetIndexer(), ns.Informer().GetIndexer()
	})
	return upstream.c, upstream.err
}

// newReference prepares the objects as upstream's informers would serve
// them: after API defaulting (policyTypes, port protocol), which upstream
// relies on.
func newReference(t testing.TB, policies []*networkingv1.NetworkPolicy, namespaces []*v1.Namespace) *reference {
	if _, err := upstreamController(); err != nil {
		t.Fatalf("%s: NewController: %v", referenceModule, err)
	}
	r := &reference{gen: upstream.gens.Add(1)}
	for _, np := range policies {
		r.policies = append(r.policies, apiDefaults(np))
	}
	for _, ns := range namespaces {
		r.namespaces = append(r.namespaces, ns)
	}
	return r
}

// run calls f with upstream's listers holding r's objects.
func (r *reference) run(t testing.TB, f func(c *networkpolicy.Controller) bool) bool {
	upstream.mu.Lock()
	defer upstream.mu.Unlock()
	if upstream.loaded != r.gen {
		if err := upstream.policies.Replace(r.policies, ""); err != nil {
			t.Fatal(err)
		}
		if err := upstream.namespaces.Replace(r.namespaces, ""); err != nil {
			t.Fatal(err)
		}
		upstream.loaded = r.gen
	}
	return f(upstream.c)
}

// egress and ingress answer for a connection from srcPod/srcIP to
// dstPod/dstIP:dstPort; a nil pod is a non-pod address. The source port is
// irrelevant to NetworkPolicy; upstream passes it but never reads it.
func (r *reference) egress(t testing.TB, srcPod, dstPod *v1.Pod, dstIP string, dstPort int, proto v1.Protocol) bool {
	return r.run(t, func(c *networkpolicy.Controller) bool {
		return refEvaluator(c, t.Context(), refPoliciesForPod(c, srcPod), networkingv1.PolicyTypeEgress,
			srcPod, 40000, dstPod, parseIP(t, dstIP), dstPort, proto)
	})
}

func (r *reference) ingress(t testing.TB, srcPod *v1.Pod, srcIP string, dstPod *v1.Pod, dstPort int, proto v1.Protocol) bool {
	return r.run(t, func(c *networkpolicy.Controller) bool {
		policies := refPoliciesForPod(c, dstPod)
		if len(policies) == 0 {
			return true
		}
		return refEvaluator(c, t.Context(), policies, networkingv1.PolicyTypeIngress,
			dstPod, dstPort, srcPod, parseIP(t, srcIP), 40000, proto)
	})
}

// TestReferenceSanity guards the linkname'd signatures: with a wrong one the
// calls below would crash or answer nonsense.
func TestReferenceSanity(t *testing.T) {
	x := []*v1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "x", Labels: map[string]string{"ns": "x"}}}}
	a := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a", Labels: map[string]string{"pod": "a"}}}
	b := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "b", Labels: map[string]string{"pod": "b"}}}
	tcp := v1.ProtocolTCP
	p80 := intstr.FromInt32(80)
	allowB := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "allow-b"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"pod": "a"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p80}},
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"pod": "b"}}}},
			}},
		},
	}
	ref := newReference(t, []*networkingv1.NetworkPolicy{allowB}, x)
	for _, c := range []struct {
		src     *v1.Pod
		srcIP   string
		dst     *v1.Pod
		port    int
		ingress bool
	}{
		{b, "10.0.0.2", a, 80, true},
		{b, "10.0.0.2", a, 81, false},
		{a, "10.0.0.1", a, 80, false},
		{nil, "192.168.1.1", a, 80, false},
		{a, "10.0.0.1", b, 81, true},
	} {
		if got := ref.ingress(t, c.src, c.srcIP, c.dst, c.port, tcp); got != c.ingress {
			t.Errorf("reference ingress %s -> %s:%d = %v, want %v", c.srcIP, c.dst.Name, c.port, got, c.ingress)
		}
		if !ref.egress(t, c.src, c.dst, "10.0.0.9", c.port, tcp) {
			t.Errorf("reference egress from %s denied without egress policies", c.srcIP)
		}
	}
}

// apiDefaults applies what k8s.io/kubernetes pkg/apis/networking/v1
// SetDefaults_NetworkPolicy and SetDefaults_NetworkPolicyPort do.
func apiDefaults(np *networkingv1.NetworkPolicy) *networkingv1.NetworkPolicy {
	np = np.DeepCopy()
	if len(np.Spec.PolicyTypes) == 0 {
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if len(np.Spec.Egress) != 0 {
			np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
		}
	}
	tcp := v1.ProtocolTCP
	def := func(ports []networkingv1.NetworkPolicyPort) {
		for i := range ports {
			if ports[i].Protocol == nil {
				ports[i].Protocol = &tcp
			}
		}
	}
	for i := range np.Spec.Ingress {
		def(np.Spec.Ingress[i].Ports)
	}
	for i := range np.Spec.Egress {
		def(np.Spec.Egress[i].Ports)
	}
	return np
}

func parseIP(t testing.TB, s string) net.IP {
	ip := net.ParseIP(s)
	if ip == nil {
		t.Fatalf("bad IP %q", s)
	}
	return ip
}

// TestReferenceEmptyRuleListQuirk records the one place where the
// differential test keeps the generator away from upstream: upstream treats
// a non-nil empty rule list (`ingress: []` decoded in-process) as allow-all,
// because it tests `Spec.Ingress == nil` for deny and then allows on
// len(rules) == 0. The API server never serves that form (the field is
// omitempty, so an informer sees nil), and the API says an empty list
// allows nothing; we deny for both forms.
func TestReferenceEmptyRuleListQuirk(t *testing.T) {
	pol := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{},
		},
	}
	dst := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a"}}
	ns := []*v1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "x"}}}

	nilForm := pol.DeepCopy()
	nilForm.Spec.Ingress = nil
	if newReference(t, []*networkingv1.NetworkPolicy{nilForm}, ns).ingress(t, nil, "192.168.1.5", dst, 80, v1.ProtocolTCP) {
		t.Fatal("reference allows with a nil rule list; the premise of this test is wrong")
	}
	if !newReference(t, []*networkingv1.NetworkPolicy{pol}, ns).ingress(t, nil, "192.168.1.5", dst, 80, v1.ProtocolTCP) {
		t.Fatal("reference denies an empty non-nil rule list: the quirk is gone, let the generator produce that form")
	}
	for _, p := range []*networkingv1.NetworkPolicy{pol, nilForm} {
		s, err := netpol.NewSnapshot([]*networkingv1.NetworkPolicy{p}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ev, _ := netpol.New(s, s)
		c := netpol.Conn{Src: netpol.Endpoint{IP: netip.MustParseAddr("192.168.1.5")}, Dst: netpol.Endpoint{IP: netip.MustParseAddr("10.0.0.1"), Pod: toNetpolPod(dst)}, Port: 80}
		if v := ev.Ingress(c); v.Allowed {
			t.Errorf("ingress %v with Ingress=%#v: %s", v.Allowed, p.Spec.Ingress, v)
		}
	}
}
