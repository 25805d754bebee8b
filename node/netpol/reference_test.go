package netpol_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// The reference evaluator (reference_networkpolicy_test.go) is methods of
// upstream's Controller; these are the fields they use.
type Config struct{ NodeName string }

type Controller struct {
	config              Config
	networkpolicyLister networkinglisters.NetworkPolicyLister
	namespaceLister     corelisters.NamespaceLister
	podLister           corelisters.PodLister
}

const (
	referenceFile   = "reference_networkpolicy_test.go"
	referenceModule = "sigs.k8s.io/kube-network-policies@v0.8.0"
	referencePath   = "pkg/networkpolicy/networkpolicy.go"
	// sha256 of referencePath in referenceModule.
	referenceSHA256 = "c5c0bd0bd6141f8553b077beafa2ccf3a8b3890368f2d1eac8b2f00470cde2f5"
)

// TestReferenceIsVerbatim makes sure the differential test compares against
// upstream's code and not an edited copy: with our header dropped and
// upstream's package clause restored, the file must hash to upstream's
// sha256 (recorded from the module), and equal the module's file when the
// module is in the local module cache.
func TestReferenceIsVerbatim(t *testing.T) {
	ours, err := os.ReadFile(referenceFile)
	if err != nil {
		t.Fatal(err)
	}
	const clause = "package netpol_test\n"
	i := bytes.Index(ours, []byte(clause))
	if i < 0 {
		t.Fatalf("%s: no %q", referenceFile, clause)
	}
	restored := append([]byte("package networkpolicy\n"), ours[i+len(clause):]...)
	sum := sha256.Sum256(restored)
	if got := hex.EncodeToString(sum[:]); got != referenceSHA256 {
		t.Fatalf("%s was edited: sha256 of the restored upstream file is %s, want %s", referenceFile, got, referenceSHA256)
	}

	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		t.Logf("go env GOMODCACHE: %v; hash check only", err)
		return
	}
	upstream, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), referenceModule, referencePath))
	if err != nil {
		t.Logf("upstream module not in the module cache (%v); hash check only", err)
		return
	}
	if !bytes.Equal(upstream, restored) {
		t.Fatalf("%s differs from %s/%s", referenceFile, referenceModule, referencePath)
	}
}

// reference wraps upstream's evaluator as its evaluatePacket drives it for
// NetworkPolicy (AdminNetworkPolicy disabled): the source pod's egress
// policies, then, if any select it, the destination pod's ingress policies.
type reference struct{ c *Controller }

// newReference indexes the objects as upstream's informers would serve them:
// after API defaulting (policyTypes, port protocol), which upstream relies on.
func newReference(t testing.TB, policies []*networkingv1.NetworkPolicy, namespaces []*v1.Namespace) reference {
	npIndex := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, np := range policies {
		if err := npIndex.Add(apiDefaults(np)); err != nil {
			t.Fatal(err)
		}
	}
	nsIndex := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, ns := range namespaces {
		if err := nsIndex.Add(ns); err != nil {
			t.Fatal(err)
		}
	}
	return reference{c: &Controller{
		networkpolicyLister: networkinglisters.NewNetworkPolicyLister(npIndex),
		namespaceLister:     corelisters.NewNamespaceLister(nsIndex),
	}}
}

// egress and ingress answer for a connection from srcPod/srcIP to
// dstPod/dstIP:dstPort; a nil pod is a non-pod address. The source port is
// irrelevant to NetworkPolicy; upstream passes it but never reads it.
func (r reference) egress(t testing.TB, srcPod, dstPod *v1.Pod, dstIP string, dstPort int, proto v1.Protocol) bool {
	return r.c.evaluator(t.Context(), r.c.getNetworkPoliciesForPod(srcPod), networkingv1.PolicyTypeEgress,
		srcPod, 40000, dstPod, parseIP(t, dstIP), dstPort, proto)
}

func (r reference) ingress(t testing.TB, srcPod *v1.Pod, srcIP string, dstPod *v1.Pod, dstPort int, proto v1.Protocol) bool {
	policies := r.c.getNetworkPoliciesForPod(dstPod)
	if len(policies) == 0 {
		return true
	}
	return r.c.evaluator(t.Context(), policies, networkingv1.PolicyTypeIngress,
		dstPod, dstPort, srcPod, parseIP(t, srcIP), 40000, proto)
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
