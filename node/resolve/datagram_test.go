package resolve

import (
	"errors"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// TestDatagramCandidates: a UDP (or SCTP) ClusterIP:port lists its
// endpoints by protocol, apart from TCP: the TCP lookups of the same
// address and port number do not see it, and a TCP port is not a UDP one.
func TestDatagramCandidates(t *testing.T) {
	svc := service()
	svc.Spec.Ports = append(svc.Spec.Ports,
		corev1.ServicePort{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP},
		corev1.ServicePort{Name: "sig", Port: 2905, Protocol: corev1.ProtocolSCTP})
	sl := slice(map[string]bool{"10.0.0.1": true, "10.0.0.2": false})
	sl.Ports = append(sl.Ports,
		discoveryv1.EndpointPort{Name: ptr.To("dns"), Port: ptr.To(int32(5353)), Protocol: ptr.To(corev1.ProtocolUDP)},
		discoveryv1.EndpointPort{Name: ptr.To("dns-tcp"), Port: ptr.To(int32(5354))},
		discoveryv1.EndpointPort{Name: ptr.To("sig"), Port: ptr.To(int32(2906)), Protocol: ptr.To(corev1.ProtocolSCTP)})
	r, client := run(t, svc, sl)
	dns := netip.MustParseAddrPort("10.96.0.10:53")
	waitFor(t, func() bool { _, ok, err := r.DatagramCandidates(corev1.ProtocolUDP, dns); return ok && err == nil })

	for _, tc := range []struct {
		proto corev1.Protocol
		dst   string
		want  string // "" not a service
	}{
		{corev1.ProtocolUDP, "10.96.0.10:53", "10.0.0.1:5353"},
		{corev1.ProtocolSCTP, "10.96.0.10:2905", "10.0.0.1:2906"},
		{corev1.ProtocolSCTP, "10.96.0.10:53", ""},
		{corev1.ProtocolUDP, "10.96.0.10:80", ""}, // a TCP port only
		{corev1.ProtocolUDP, "10.96.0.11:53", ""},
	} {
		eps, ok, err := r.DatagramCandidates(tc.proto, netip.MustParseAddrPort(tc.dst))
		if tc.want == "" {
			if ok || len(eps) != 0 {
				t.Errorf("%s %s: a service (%v)", tc.proto, tc.dst, eps)
			}
			continue
		}
		if !ok || err != nil || len(eps) != 1 || eps[0].Addr != netip.MustParseAddrPort(tc.want) {
			t.Errorf("%s %s = %v, %v, %v; want [%s]", tc.proto, tc.dst, eps, ok, err, tc.want)
		}
	}
	// TCP on the same ClusterIP:53 is the TCP port, as before.
	eps, ok, err := r.Candidates(dns)
	if !ok || err != nil || len(eps) != 1 || eps[0].Addr != netip.MustParseAddrPort("10.0.0.1:5354") {
		t.Errorf("TCP Candidates(%s) = %v, %v, %v; want the dns-tcp endpoint", dns, eps, ok, err)
	}

	// No ready endpoint: ErrNoEndpoints; the Service gone: not a service.
	sl.Endpoints[0].Conditions.Ready = ptr.To(false)
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(t.Context(), sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		_, _, err := r.DatagramCandidates(corev1.ProtocolUDP, dns)
		return errors.Is(err, ErrNoEndpoints)
	})
	if err := client.CoreV1().Services("default").Delete(t.Context(), "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { _, ok, _ := r.DatagramCandidates(corev1.ProtocolUDP, dns); return !ok })
}
