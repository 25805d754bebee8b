package netpol_test

import (
	"fmt"
	"net/netip"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/node/netpol"
)

// BenchmarkIngress measures one decision with n policies in the destination
// pod's namespace, every one selecting it (the worst case: each is scanned),
// each with a rule of peers (namespace and pod selectors, ipBlock) and
// ports (number, range, name). "denied" matches no rule; "allowed-last"
// matches only the last policy.
func BenchmarkIngress(b *testing.B) {
	for _, n := range []int{10, 100} {
		var policies []*networkingv1.NetworkPolicy
		for i := range n {
			p := withIngress(np("x", fmt.Sprintf("p%03d", i), expr("app", metav1.LabelSelectorOpIn, "web", "api")),
				from(ports(port("", 9000+i), port("", 20000+i, int32(20010+i)), port("", "metrics")),
					both(sel("ns", "y"), sel("pod", fmt.Sprintf("b%d", i))),
					nss(sel("env", "staging", "tier", fmt.Sprint(i))),
					block("172.16.0.0/12", "172.16.1.0/24")))
			policies = append(policies, p)
		}
		s, err := netpol.NewSnapshot(policies, tableNamespaces)
		if err != nil {
			b.Fatal(err)
		}
		ev, _ := netpol.New(s, s)
		src := &netpol.Pod{Namespace: "y", Name: "b", Labels: map[string]string{"pod": fmt.Sprintf("b%d", n-1)}}
		dst := tablePods["x/a"].pod
		for _, bc := range []struct {
			name string
			port int32
			want bool
		}{{"denied", 9000 + int32(n), false}, {"allowed-last", 9000 + int32(n-1), true}} {
			c := netpol.Conn{
				Src:  netpol.Endpoint{IP: netip.MustParseAddr("10.0.1.2"), Pod: src},
				Dst:  netpol.Endpoint{IP: netip.MustParseAddr("10.0.0.1"), Pod: dst},
				Port: bc.port,
			}
			if v := ev.Ingress(c); v.Allowed != bc.want {
				b.Fatalf("%d policies %s: verdict %s", n, bc.name, v)
			}
			b.Run(fmt.Sprintf("policies=%d/%s", n, bc.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					ev.Ingress(c)
				}
			})
		}
	}
}
