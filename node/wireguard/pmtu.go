package wireguard

import "encoding/binary"

// fragNeeded answers an IPv4 packet from the node's kernel (encrypt-all)
// that is larger than the inner MTU and may not be fragmented (DF) the way
// a router on a smaller link does: an ICMP "fragmentation needed" (RFC
// 792, RFC 1191) to its source, from its destination (the node's own
// address would be a martian source on the host TUN, and the kernel would
// drop it; pods accept the error from any address), with the MTU as the
// next-hop MTU, quoting the packet's IP header and first 8 bytes. The
// pod's kernel then sends to that destination in pieces that fit (TCP is
// already clamped: clampSYN). It returns nil for packets that fit, are not
// IPv4 with DF, are themselves ICMP errors, or are malformed; the caller
// forwards those as they are.
func fragNeeded(p []byte, mtu int) []byte {
	if len(p) <= mtu || len(p) < 20 || p[0]>>4 != 4 {
		return nil
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < 20 || len(p) < ihl+8 || binary.BigEndian.Uint16(p[6:8])&0x4000 == 0 {
		return nil // malformed, or DF not set: may be fragmented
	}
	if p[9] == 1 && p[ihl] != 0 && p[ihl] != 8 {
		return nil // never answer an ICMP error with one
	}
	quote := p[:ihl+8]
	out := make([]byte, 20+8+len(quote))
	// IP header.
	out[0] = 0x45
	binary.BigEndian.PutUint16(out[2:4], uint16(len(out)))
	out[8] = 64                // TTL
	out[9] = 1                 // ICMP
	copy(out[12:16], p[16:20]) // from the packet's destination
	copy(out[16:20], p[12:16]) // to its source
	binary.BigEndian.PutUint16(out[10:12], inetChecksum(out[:20]))
	// ICMP destination unreachable, fragmentation needed.
	icmp := out[20:]
	icmp[0], icmp[1] = 3, 4
	binary.BigEndian.PutUint16(icmp[6:8], uint16(min(mtu, 0xffff)))
	copy(icmp[8:], quote)
	binary.BigEndian.PutUint16(icmp[2:4], inetChecksum(icmp))
	return out
}

// inetChecksum is the Internet checksum (RFC 1071) of b.
func inetChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
