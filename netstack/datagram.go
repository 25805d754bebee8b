package netstack

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Datagram is the first packet of a non-TCP flow from a pod (UDP, SCTP,
// ICMP, any other IP protocol), as a DatagramDecider sees it.
type Datagram struct {
	// NIC is the pod NIC the packet came from: the pod's identity, as
	// for Flow.
	NIC NICID
	// Proto is the IP protocol number (IPv6: the first next header;
	// extension headers are not walked, so such packets carry theirs).
	Proto uint8
	// Src and Dst carry ports for UDP, UDP-Lite, SCTP and DCCP; ports are
	// 0 for other protocols (ICMP, ICMPv6) and for fragments, which carry
	// no reliable ports.
	Src, Dst netip.AddrPort
}

// IP protocol numbers whose header starts with a source and a
// destination port.
const (
	protoDCCP    = 33
	protoUDP     = 17
	protoSCTP    = 132
	protoUDPLite = 136
)

// DatagramDecider is implemented by a FlowHandler that judges non-TCP
// flows before their packets reach the host. Without it every non-TCP
// packet is passed through, as before. HandleDatagram runs on the NIC's
// reader goroutine, once per new flow (see datagramTable): it must not
// block. It reports whether the flow may pass; a refused one is dropped
// silently (as a CNI's policy drop) and counted in NICStats.
type DatagramDecider interface {
	HandleDatagram(Datagram) bool
}

const (
	// maxDatagramFlows bounds the decisions one NIC remembers. Past it a
	// sweep drops expired ones; when none is expired the decision of the
	// new flow is not remembered (its next packet is decided again, slower
	// but never wrong: counted in NICStats.DatagramTableFull).
	maxDatagramFlows = 16384
	// datagramIdleTTL is how long an allowed flow is remembered after its
	// last packet, like conntrack's UDP timeout (30 s unreplied): a policy
	// change that denies a flow applies once it was idle this long.
	datagramIdleTTL = 30 * time.Second
	// datagramDenyTTL is how long a denied flow is remembered from its
	// decision, however busy: a flooding sender costs one decision per
	// flow per datagramDenyTTL, and a policy change that allows the flow
	// applies within it.
	datagramDenyTTL = 2 * time.Second
)

// datagramKey is one non-TCP flow of a NIC.
type datagramKey struct {
	proto    uint8
	src, dst netip.AddrPort
}

type datagramEntry struct {
	allowed bool
	at      int64 // allowed: last packet; denied: the decision (Stack.now)
}

// datagramTable is one NIC's memory of non-TCP flow decisions. The zero
// value is ready. Only the NIC's reader goroutine decides; the mutex is
// for Stats and keeps it safe if that ever changes.
type datagramTable struct {
	mu sync.Mutex
	m  map[datagramKey]datagramEntry

	decisions atomic.Uint64 // HandleDatagram calls
	denied    atomic.Uint64 // packets dropped as denied
	full      atomic.Uint64 // decisions not remembered (table full)
}

func (e datagramEntry) live(now int64) bool {
	if e.allowed {
		return now-e.at < int64(datagramIdleTTL)
	}
	return now-e.at < int64(datagramDenyTTL)
}

// lookup returns the remembered decision of k, refreshing an allowed one.
func (t *datagramTable) lookup(k datagramKey, now int64) (allowed, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.m[k]
	if !ok || !e.live(now) {
		return false, false
	}
	if e.allowed {
		e.at = now
		t.m[k] = e
	}
	return e.allowed, true
}

// remember stores the decision of k, sweeping expired entries when the
// table is at its cap. It reports false when the decision could not be
// remembered.
func (t *datagramTable) remember(k datagramKey, allowed bool, now int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[datagramKey]datagramEntry{}
	}
	if _, exists := t.m[k]; !exists && len(t.m) >= maxDatagramFlows {
		for key, e := range t.m {
			if !e.live(now) {
				delete(t.m, key)
			}
		}
		if len(t.m) >= maxDatagramFlows {
			return false
		}
	}
	t.m[k] = datagramEntry{allowed: allowed, at: now}
	return true
}

func (t *datagramTable) size() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// datagramKeyOf is the flow of a non-TCP packet whose header (the leading
// bytes the classifier pulled up) is hdr.
func datagramKeyOf(hdr []byte, info *packetInfo) datagramKey {
	k := datagramKey{proto: info.proto, src: netip.AddrPortFrom(info.src, 0), dst: netip.AddrPortFrom(info.dst, 0)}
	switch info.proto {
	case protoUDP, protoUDPLite, protoSCTP, protoDCCP:
		if !info.fragment && len(hdr) >= info.ipHdrLen+4 {
			t := hdr[info.ipHdrLen:]
			k.src = netip.AddrPortFrom(info.src, binary.BigEndian.Uint16(t[0:2]))
			k.dst = netip.AddrPortFrom(info.dst, binary.BigEndian.Uint16(t[2:4]))
		}
	}
	return k
}

// datagramAllowed judges a non-TCP packet from the pod: by the remembered
// decision of its flow, else by the handler's DatagramDecider. A denied
// packet is counted; the caller drops it.
func (n *nic) datagramAllowed(hdr []byte, info *packetInfo) bool {
	dd, ok := n.s.opts.Handler.(DatagramDecider)
	if !ok {
		return true
	}
	k := datagramKeyOf(hdr, info)
	now := n.s.now()
	allowed, known := n.datagrams.lookup(k, now)
	if !known {
		n.datagrams.decisions.Add(1)
		allowed = dd.HandleDatagram(Datagram{NIC: n.id, Proto: k.proto, Src: k.src, Dst: k.dst})
		if !n.datagrams.remember(k, allowed, now) {
			n.datagrams.full.Add(1)
		}
	}
	if !allowed {
		n.datagrams.denied.Add(1)
	}
	return allowed
}
