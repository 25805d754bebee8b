package outbound

import (
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/resolve"
)

// DatagramAccess is the part of Access that judges non-TCP flows: the
// agent's enforcer implements it. A Decider whose Access does not drops
// every non-TCP flow (fail closed).
type DatagramAccess interface {
	// EgressDatagram judges, by src's NetworkPolicy egress rules, the
	// non-TCP flow g from the verified local pod src to dst (for a
	// ClusterIP, one of its endpoints) over proto. It counts and logs a
	// denial once per flow.
	EgressDatagram(g netstack.Datagram, src *pods.Pod, dst netip.AddrPort, proto corev1.Protocol) (allowed bool, err error)
}

// DatagramServices lists the endpoints of UDP and SCTP ClusterIP ports
// (resolve.Resolver). Services that do not implement it leave every
// destination judged as an address.
type DatagramServices interface {
	DatagramCandidates(proto corev1.Protocol, dst netip.AddrPort) (eps []resolve.Endpoint, isService bool, err error)
}

var (
	_ netstack.DatagramDecider = (*Handler)(nil)
	_ DatagramServices         = (*resolve.Resolver)(nil)
)

// ReasonNotTCP is the reason of a non-TCP flow let through.
const ReasonNotTCP = "not_tcp"

// DatagramProtocol is the NetworkPolicy protocol of IP protocol number p.
// Kubernetes knows TCP, UDP and SCTP only; other protocols get a name no
// policy port can carry (ICMP, ICMPv6, IP-<n>), so a rule with ports never
// matches them and a rule without ports does, as the API says for rules
// without ports ("all ports and protocols") and as CNIs enforce it.
func DatagramProtocol(p uint8) corev1.Protocol {
	switch p {
	case 6:
		return corev1.ProtocolTCP
	case 17:
		return corev1.ProtocolUDP
	case 132:
		return corev1.ProtocolSCTP
	case 1:
		return "ICMP"
	case 58:
		return "ICMPv6"
	}
	return corev1.Protocol(fmt.Sprintf("IP-%d", p))
}

// DecideDatagram judges the first packet of a non-TCP flow from a local
// pod. The mesh carries only TCP: non-TCP packets are passed to the node
// through the agent's host TUN, not through the pod's veth, where the
// primary CNI enforces egress NetworkPolicy. So the source's egress
// policy is applied here, like for a passed-through TCP flow (pass): Pass
// lets the flow through, any other verdict drops it.
//
// Fail closed: before the agent has synced, for an unknown NIC, or when a
// lookup fails, the packet is dropped (the pod's DNS waits for the sync
// at agent start; the next packet of the flow is judged again within
// netstack's deny TTL). For a UDP or SCTP ClusterIP, kube-proxy picks the
// endpoint, so every candidate must be allowed; with none the flow is
// dropped, as kube-proxy would reject it.
func (d *Decider) DecideDatagram(g netstack.Datagram) Decision {
	src := d.Local.ByNIC(g.NIC)
	if src == nil {
		return decision(Hold, ReasonUnknownSrc)
	}
	if !d.Synced() {
		return decision(Hold, ReasonNotSynced)
	}
	if d.Access == nil {
		return decision(Pass, ReasonNotTCP)
	}
	da, ok := d.Access.(DatagramAccess)
	if !ok {
		return decision(Hold, ReasonLookupFailed)
	}
	proto := DatagramProtocol(g.Proto)
	targets := []netip.AddrPort{g.Dst}
	if ds, ok := d.Services.(DatagramServices); ok && (proto == corev1.ProtocolUDP || proto == corev1.ProtocolSCTP) {
		eps, isSvc, err := ds.DatagramCandidates(proto, g.Dst)
		if isSvc {
			if err != nil {
				return decision(Refuse, ReasonNoEndpoints)
			}
			targets = targets[:0]
			for _, ep := range eps {
				targets = append(targets, ep.Addr)
			}
		}
	}
	for _, dst := range targets {
		allowed, err := da.EgressDatagram(g, src, dst, proto)
		if v := passIfAllowed(allowed, err, ReasonNotTCP); v.Verdict != Pass {
			return v
		}
	}
	return decision(Pass, ReasonNotTCP)
}

// HandleDatagram implements netstack.DatagramDecider. It runs on the
// pod NIC's reader goroutine and does not block: a flow that cannot be
// judged yet is dropped, not held. Denials are counted and logged by
// Access; other drops here.
func (h *Handler) HandleDatagram(g netstack.Datagram) bool {
	d := h.decider.DecideDatagram(g)
	if d.Verdict == Pass {
		return true
	}
	// Counted per decision: netstack remembers a denial for a while, so a
	// flooding sender is not counted per packet.
	h.metrics.Refused.WithLabelValues("datagram_" + d.Reason).Inc()
	// A policy denial was logged by Access, with the policy.
	if d.Verdict != Deny && h.logRate.allow(10*time.Second) {
		h.log.Info("non-TCP flow dropped (further drops only counted for 10s)", "proto", g.Proto,
			"src", g.Src.String(), "dst", g.Dst.String(), "reason", d.Reason)
	}
	return false
}
