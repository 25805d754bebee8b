package resolve

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// datagramVIP is a UDP or SCTP ClusterIP:port. These are kept apart from
// the TCP ones (Resolver.vips) so that nothing the mesh does for TCP
// (Candidates, IsService, Resolve) changes: a Service with the same port
// number over TCP and UDP (DNS) has two entries, one per protocol.
type datagramVIP struct {
	proto corev1.Protocol
	vip   netip.AddrPort
}

// setDatagramVIP indexes (or, with remove, forgets) the non-TCP port p of
// the Service key at the ClusterIP a. Called with r.mu held.
func (r *Resolver) setDatagramVIP(a netip.Addr, p corev1.ServicePort, key types.NamespacedName, remove bool) {
	if p.Protocol != corev1.ProtocolUDP && p.Protocol != corev1.ProtocolSCTP {
		return
	}
	k := datagramVIP{proto: p.Protocol, vip: netip.AddrPortFrom(a, uint16(p.Port))}
	if remove {
		delete(r.dvips, k)
		return
	}
	r.dvips[k] = servicePort{svc: key, name: p.Name}
}

// DatagramCandidates is Candidates for a UDP or SCTP ClusterIP:port: the
// endpoints kube-proxy would pick from for a datagram flow to dst. The
// agent does not resolve these flows itself (it passes them through and
// kube-proxy translates them); it needs the candidates to apply the
// source's egress NetworkPolicy to every one of them.
func (r *Resolver) DatagramCandidates(proto corev1.Protocol, dst netip.AddrPort) (eps []Endpoint, ok bool, err error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	sp, ok := r.dvips[datagramVIP{proto: proto, vip: dst}]
	if !ok {
		return nil, false, nil
	}
	eps = r.candidatesLocked(sp, func(a netip.Addr) bool { return a.Is4() == dst.Addr().Is4() })
	if len(eps) == 0 {
		return nil, true, fmt.Errorf("service %s %s port %q: %w", sp.svc, proto, sp.name, ErrNoEndpoints)
	}
	return eps, true, nil
}
