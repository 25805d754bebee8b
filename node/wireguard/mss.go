package wireguard

import (
	"encoding/binary"

	"github.com/tunmesh/tunmesh/netstack"
)

// clampSYN lowers the MSS option of a TCP SYN or SYN-ACK in the IP packet p
// to what fits the inner MTU, fixing the TCP checksum incrementally (RFC
// 1624). Packets from the node's kernel (encrypt-all) come from pods whose
// interface MTU is the underlay's, larger than the inner MTU: without the
// clamp their full-size segments would not fit one WireGuard datagram.
// Both ends of a connection between two nodes are clamped, each by its own
// node's agent, on the SYN and the SYN-ACK. It reports whether it changed
// p; anything else (not TCP, no SYN, no or malformed options, fragments) is
// left alone.
func clampSYN(p []byte, mtu int) bool {
	if len(p) < 1 {
		return false
	}
	var ipHdr, overhead int
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 || p[9] != 6 || binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 {
			return false // not TCP, or a fragment
		}
		ipHdr, overhead = int(p[0]&0x0f)*4, 40
	case 6:
		if len(p) < 40 || p[6] != 6 {
			return false // not TCP (or behind extension headers: left alone)
		}
		ipHdr, overhead = 40, 60
	default:
		return false
	}
	if mtu <= overhead || ipHdr < 20 || len(p) < ipHdr+20 {
		return false
	}
	limit := uint16(min(mtu-overhead, 0xffff))
	if p[ipHdr+13]&0x02 == 0 { // not a SYN
		return false
	}
	return netstack.ClampMSS(p, ipHdr, limit)
}
