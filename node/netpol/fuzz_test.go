package netpol_test

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// FuzzEvaluate feeds arbitrary NetworkPolicy specs (as JSON, the form the
// API carries) into a generated cluster. It checks that Compile and the
// evaluator never panic, that compile errors wrap ErrInvalidPolicy, that
// verdicts are consistent and deterministic (same verdict from a second,
// independently built snapshot), and, for specs that compile cleanly (the
// ones the API server would accept), that the verdicts agree with
// kube-network-policies. Seeds are below and in testdata/fuzz/FuzzEvaluate.
func FuzzEvaluate(f *testing.F) {
	for _, s := range []string{
		`{}`,
		`{"podSelector":{},"policyTypes":["Ingress","Egress"]}`,
		`{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}},"podSelector":{"matchExpressions":[{"key":"app","operator":"DoesNotExist"}]}}],"ports":[{"port":"http"},{"protocol":"UDP","port":53,"endPort":80}]}]}`,
		`{"podSelector":{},"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.0.1.0/24"]}},{"ipBlock":{"cidr":"fd00::/16","except":["fd00::1:0/112"]}}]}]}`,
		`{"podSelector":{"matchExpressions":[{"key":"app","operator":"In"}]},"ingress":[{"from":[{}]}]}`,
		`{"podSelector":{},"ingress":[{"ports":[{"port":"80"},{"protocol":"","port":80},{"port":0},{"port":"http","endPort":90}]}]}`,
		`{"podSelector":{},"policyTypes":["Egress"],"ingress":[{}],"egress":[]}`,
	} {
		f.Add([]byte(s), uint64(1), uint64(7))
	}
	f.Fuzz(func(t *testing.T, spec []byte, seed, connSeed uint64) {
		var np networkingv1.NetworkPolicy
		if err := json.Unmarshal(spec, &np.Spec); err != nil {
			return
		}
		// Round-trip through JSON as the API server serves objects: empty
		// lists become nil (see TestReferenceEmptyRuleListQuirk).
		b, err := json.Marshal(np.Spec)
		if err != nil {
			t.Fatal(err)
		}
		np.Spec = networkingv1.NetworkPolicySpec{}
		if err := json.Unmarshal(b, &np.Spec); err != nil {
			t.Fatal(err)
		}
		np.ObjectMeta = metav1.ObjectMeta{Namespace: "x", Name: "fuzz"}

		r := rand.New(rand.NewPCG(seed, 0))
		w := genWorld(r)
		w.policies = append(w.policies, &np)
		_, compileErr := netpol.Compile(&np)
		if compileErr != nil && !errors.Is(compileErr, netpol.ErrInvalidPolicy) {
			t.Fatalf("Compile error %v does not wrap ErrInvalidPolicy", compileErr)
		}
		ns := map[string]map[string]string{}
		for _, n := range w.namespaces {
			ns[n.Name] = n.Labels
		}
		s1, _ := netpol.NewSnapshot(w.policies, ns)
		s2, _ := netpol.NewSnapshot(w.policies, ns)
		ev1, _ := netpol.New(s1, s1)
		ev2, _ := netpol.New(s2, s2)
		var ref *reference
		if compileErr == nil {
			ref = newReference(t, w.policies, w.namespaces)
		}

		cr := rand.New(rand.NewPCG(connSeed, 1))
		for range 8 {
			si, di := cr.IntN(len(w.pods)+1)-1, cr.IntN(len(w.pods)+1)-1
			var c netpol.Conn
			var srcPod, dstPod *v1.Pod
			var srcIP, dstIP string
			fam := cr.IntN(2)
			if si < 0 {
				srcIP = genExternal[cr.IntN(len(genExternal))]
			} else {
				srcPod, srcIP = w.pods[si], w.podIPs[si][fam]
			}
			if di < 0 {
				dstIP = genExternal[cr.IntN(len(genExternal))]
			} else {
				dstPod, dstIP = w.pods[di], w.podIPs[di][fam]
			}
			c.Src = netpol.Endpoint{IP: netip.MustParseAddr(srcIP), Pod: toNetpolPod(srcPod)}
			c.Dst = netpol.Endpoint{IP: netip.MustParseAddr(dstIP), Pod: toNetpolPod(dstPod)}
			c.Port = int32(cr.IntN(65536))
			if cr.IntN(2) == 0 {
				c.Port = genPortNums[cr.IntN(len(genPortNums))]
			}
			c.Protocol = []v1.Protocol{"", v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP}[cr.IntN(4)]

			eg, in := ev1.Egress(c), ev1.Ingress(c)
			checkVerdict(t, eg)
			checkVerdict(t, in)
			if eg2, in2 := ev2.Egress(c), ev2.Ingress(c); eg2.String() != eg.String() || in2.String() != in.String() {
				t.Fatalf("not deterministic: %s / %s, then %s / %s", eg, in, eg2, in2)
			}
			if compileErr != nil {
				continue
			}
			proto := c.Protocol
			if proto == "" {
				proto = v1.ProtocolTCP
			}
			wantEg := ref.egress(t, srcPod, dstPod, dstIP, int(c.Port), proto)
			wantIn := ref.ingress(t, srcPod, srcIP, dstPod, int(c.Port), proto)
			if eg.Allowed != wantEg || in.Allowed != wantIn {
				t.Fatalf("%s -> %s:%d/%s: egress %s, ingress %s; reference egress %v, ingress %v\nspec %s\n%s",
					srcIP, dstIP, c.Port, proto, eg, in, wantEg, wantIn, b, dump(w))
			}
		}
	})
}
