package outbound

import (
	"errors"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/resolve"
)

func (a *engineAccess) EgressDatagram(g netstack.Datagram, src *pods.Pod, dst netip.AddrPort, proto corev1.Protocol) (bool, error) {
	if a.err != nil {
		return false, a.err
	}
	d := a.e.Egress(a.c.pods[src.Addrs[0]], g.Src.Addr(), dst, a.c.pods[dst.Addr()], proto)
	if !d.Allowed {
		a.denied = append(a.denied, string(proto)+" "+dst.String())
	}
	return d.Allowed, nil
}

// datagramServices adds UDP/SCTP ClusterIPs to fakeServices.
type datagramServices struct {
	fakeServices
	dgram map[corev1.Protocol]map[netip.AddrPort][]resolve.Endpoint
}

func (s datagramServices) DatagramCandidates(proto corev1.Protocol, dst netip.AddrPort) ([]resolve.Endpoint, bool, error) {
	eps, ok := s.dgram[proto][dst]
	if !ok {
		return nil, false, nil
	}
	if len(eps) == 0 {
		return nil, true, resolve.ErrNoEndpoints
	}
	return eps, true, nil
}

// tcpOnlyAccess is an Access without DatagramAccess.
type tcpOnlyAccess struct{ Access }

// allowAllTo lets every pod of ns reach pods labelled app=legacy on every
// port and protocol (a rule without ports).
func allowAllTo(ns string) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "all-to-legacy"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "legacy"}}}},
			}},
		}}
}

// dnsToLegacyOnly isolates ns for egress but for UDP 53 to app=legacy.
func dnsToLegacyOnly(ns string) *networkingv1.NetworkPolicy {
	p := denyAllEgress(ns)
	p.Spec.Egress[0].To = []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "legacy"}}}}
	return p
}

// TestDecideDatagram: a non-TCP flow of a meshed pod gets the source's
// egress NetworkPolicy, as a passed-through TCP flow does; a ClusterIP
// needs every endpoint allowed; ICMP matches only rules without ports;
// whatever cannot be judged is dropped (fail closed).
func TestDecideDatagram(t *testing.T) {
	svcDNS := netip.MustParseAddrPort("10.96.0.53:53")
	svcDNSLegacy := netip.MustParseAddrPort("10.96.0.54:53")
	svcNone := netip.MustParseAddrPort("10.96.0.55:53")
	udp := func(nic netstack.NICID, dst netip.AddrPort) netstack.Datagram {
		return netstack.Datagram{NIC: nic, Proto: 17, Src: netip.AddrPortFrom(clientAddr, 40000), Dst: dst}
	}
	withProto := func(g netstack.Datagram, p uint8) netstack.Datagram { g.Proto = p; return g }
	icmp := netstack.Datagram{NIC: 1, Proto: 1, Src: netip.AddrPortFrom(clientAddr, 0), Dst: netip.AddrPortFrom(plainIP, 0)}
	deny := []*networkingv1.NetworkPolicy{denyAllEgress("prod")}
	dnsLegacy := []*networkingv1.NetworkPolicy{dnsToLegacyOnly("prod")}
	allLegacy := []*networkingv1.NetworkPolicy{denyAllEgress("prod"), allowAllTo("prod")}
	for _, tc := range []struct {
		name     string
		policies []*networkingv1.NetworkPolicy
		g        netstack.Datagram
		unsynced bool
		noAccess bool // Access without DatagramAccess
		err      error
		verdict  Verdict
		reason   string
		denied   []string
	}{
		{name: "no egress policy: passes", g: udp(1, netip.AddrPortFrom(plainIP, 9999)), verdict: Pass, reason: ReasonNotTCP},
		{name: "no egress policy: ICMP passes", g: icmp, verdict: Pass, reason: ReasonNotTCP},
		{name: "allowed UDP port", policies: deny, g: udp(1, netip.AddrPortFrom(plainIP, 53)), verdict: Pass, reason: ReasonNotTCP},
		{name: "another UDP port: denied", policies: deny, g: udp(1, netip.AddrPortFrom(plainIP, 5353)),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"UDP 10.244.2.4:5353"}},
		{name: "SCTP on the UDP port: denied", policies: deny, g: withProto(udp(1, netip.AddrPortFrom(plainIP, 53)), 132),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"SCTP 10.244.2.4:53"}},
		{name: "an off-cluster address: denied", policies: deny, g: udp(1, netip.MustParseAddrPort("203.0.113.7:123")),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"UDP 203.0.113.7:123"}},
		{name: "ICMP never matches a rule with ports", policies: deny, g: icmp,
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"ICMP 10.244.2.4:0"}},
		{name: "ICMP matches a rule without ports", policies: allLegacy, g: icmp, verdict: Pass, reason: ReasonNotTCP},
		{name: "ICMP to a pod the rule without ports does not select", policies: allLegacy,
			g:       netstack.Datagram{NIC: 1, Proto: 1, Src: icmp.Src, Dst: netip.AddrPortFrom(meshedIP, 0)},
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"ICMP 10.244.2.3:0"}},
		{name: "another IP protocol: named IP-n, matched by no port", policies: deny, g: withProto(icmp, 47),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"IP-47 10.244.2.4:0"}},
		{name: "ClusterIP: every endpoint allowed", policies: dnsLegacy, g: udp(1, svcDNSLegacy), verdict: Pass, reason: ReasonNotTCP},
		{name: "ClusterIP: one endpoint not allowed denies the Service", policies: dnsLegacy, g: udp(1, svcDNS),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"UDP 10.244.2.3:53"}},
		{name: "ClusterIP judged at its endpoints' port", policies: deny, g: udp(1, svcDNS), verdict: Pass, reason: ReasonNotTCP},
		{name: "ClusterIP with no endpoint: dropped", policies: deny, g: udp(1, svcNone), verdict: Refuse, reason: ReasonNoEndpoints},
		{name: "a TCP-only ClusterIP:port over UDP is judged as an address", policies: dnsLegacy, g: udp(1, svcPlain),
			verdict: Deny, reason: ReasonPolicyDenied, denied: []string{"UDP 10.96.0.12:80"}},
		{name: "not synced: dropped", policies: deny, unsynced: true, g: udp(1, netip.AddrPortFrom(plainIP, 53)),
			verdict: Hold, reason: ReasonNotSynced},
		{name: "unknown NIC: dropped", g: udp(9, netip.AddrPortFrom(plainIP, 53)), verdict: Hold, reason: ReasonUnknownSrc},
		{name: "lookup failed: dropped", policies: deny, err: errors.New("cannot tell"), g: udp(1, netip.AddrPortFrom(plainIP, 53)),
			verdict: Hold, reason: ReasonLookupFailed},
		{name: "an Access that cannot judge datagrams: dropped", noAccess: true, g: udp(1, netip.AddrPortFrom(plainIP, 53)),
			verdict: Hold, reason: ReasonLookupFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, c := fixture()
			a := withAccess(t, d, c, nil, tc.policies...)
			a.err = tc.err
			if tc.noAccess {
				d.Access = tcpOnlyAccess{a}
			}
			d.Synced = func() bool { return !tc.unsynced }
			c.pods[plainIP].Labels = map[string]string{"app": "legacy"}
			d.Services = datagramServices{fakeServices: d.Services.(fakeServices), dgram: map[corev1.Protocol]map[netip.AddrPort][]resolve.Endpoint{
				corev1.ProtocolUDP: {
					svcDNS:       {{Addr: netip.AddrPortFrom(plainIP, 53)}, {Addr: netip.AddrPortFrom(meshedIP, 53)}},
					svcDNSLegacy: {{Addr: netip.AddrPortFrom(plainIP, 53)}},
					svcNone:      {},
				},
			}}
			got := d.DecideDatagram(tc.g)
			if got.Verdict != tc.verdict || got.Reason != tc.reason {
				t.Fatalf("DecideDatagram = %s/%q, want %s/%q", got.Verdict, got.Reason, tc.verdict, tc.reason)
			}
			if len(a.denied) != len(tc.denied) || (len(tc.denied) > 0 && a.denied[0] != tc.denied[0]) {
				t.Fatalf("denials reported %v, want %v", a.denied, tc.denied)
			}
		})
	}
}

func TestDatagramProtocol(t *testing.T) {
	for p, want := range map[uint8]corev1.Protocol{6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6", 47: "IP-47"} {
		if got := DatagramProtocol(p); got != want {
			t.Errorf("DatagramProtocol(%d) = %q, want %q", p, got, want)
		}
	}
}
