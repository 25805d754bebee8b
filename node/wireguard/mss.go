package wireguard

import "encoding/binary"

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
	t := p[ipHdr:]
	if t[13]&0x02 == 0 { // SYN
		return false
	}
	dataOff := int(t[12]>>4) * 4
	if dataOff <= 20 || dataOff > len(t) {
		return false
	}
	for i := 20; i < dataOff; {
		kind := t[i]
		switch kind {
		case 0: // end of options
			return false
		case 1: // NOP
			i++
			continue
		}
		if i+1 >= dataOff {
			return false
		}
		optLen := int(t[i+1])
		if optLen < 2 || i+optLen > dataOff {
			return false
		}
		if kind != 2 { // not MSS
			i += optLen
			continue
		}
		if optLen != 4 {
			return false
		}
		at := i + 2
		old := binary.BigEndian.Uint16(t[at:])
		if old <= limit {
			return false
		}
		binary.BigEndian.PutUint16(t[at:], limit)
		oldW, newW := old, limit
		if at%2 == 1 {
			oldW, newW = old<<8|old>>8, limit<<8|limit>>8
		}
		s := uint32(^binary.BigEndian.Uint16(t[16:18])) + uint32(^oldW) + uint32(newW)
		for s > 0xffff {
			s = s&0xffff + s>>16
		}
		binary.BigEndian.PutUint16(t[16:18], ^uint16(s))
		return true
	}
	return false
}
