package authz

import (
	"fmt"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// BenchmarkOutbound measures the whole decision the source agent makes for
// one meshed connection (egress of the client, then the destination's
// NetworkPolicy ingress, Authorizations and default inbound policy) with n
// NetworkPolicies and n Authorizations in the destination's namespace,
// every one selecting it and the last one allowing: the worst case.
func BenchmarkOutbound(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		server := testPod("prod", "api", "10.244.1.10", "api", map[string]string{"app": "api"}, nil,
			corev1.ContainerPort{Name: "http", ContainerPort: 8080})
		client := testPod("web", "frontend", "10.244.2.10", "frontend", map[string]string{"app": "frontend", "n": fmt.Sprint(n - 1)}, nil)
		w := world{pods: []*corev1.Pod{server, client},
			ns: []*corev1.Namespace{nsObj("prod", map[string]string{"env": "prod"}, nil), nsObj("web", map[string]string{"env": "web"}, nil)}}
		for i := range n {
			w.netpols = append(w.netpols, np("prod", fmt.Sprintf("p%03d", i), map[string]string{"app": "api"}, ingressAll,
				[]networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{{
						NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"env": "web"}},
						PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"n": fmt.Sprint(i)}},
					}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptr(intstr.FromString("http"))}},
				}}, nil))
			w.authzs = append(w.authzs, az("prod", fmt.Sprintf("a%03d", i), map[string]string{"app": "api"}, nil,
				IdentityRef{ServiceAccount: &ServiceAccountRef{Name: fmt.Sprintf("sa%d", i), Namespace: "web"}},
				IdentityRef{Namespace: fmt.Sprintf("team%d", i)}))
		}
		w.authzs = append(w.authzs, az("prod", "zz-frontend", map[string]string{"app": "api"}, nil,
			IdentityRef{ServiceAccount: &ServiceAccountRef{Name: "frontend", Namespace: "web"}}))
		e := w.engine(b)
		dst := netip.MustParseAddrPort("10.244.1.10:8080")
		if d := e.Outbound(client, podIP(client), *id("web", "frontend"), dst, server); !d.Allowed {
			b.Fatalf("n=%d: %+v", n, d)
		}
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				e.Outbound(client, podIP(client), *id("web", "frontend"), dst, server)
			}
		})
	}
}
