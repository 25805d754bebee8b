package wireguard

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// GSO out of the overlay stack. The overlay NIC tells gVisor's TCP that
// the "host" segments (stack.HostGSOSupported), so it hands the TUN one
// packet of up to gsoMaxSize per send, with a partial checksum, instead of
// one packet per inner MTU. Read cuts each into inner-MTU segments for
// wireguard-go's batch. Why: gVisor's cost is per segment (the sender's
// locks, timers, header building and queueing), while a cut here is a
// header copy and a checksum; the wire still sees inner-MTU packets.

// gsoMaxSize is the largest packet the overlay stack's TCP may hand over:
// its payload stays under the IPv6 payload length limit (gVisor keeps a
// GSO segment's payload below GSOMaxSize minus the largest headers).
const gsoMaxSize = 1 << 16

// tcp6Header is the length of the TCP header of p, an IPv6 packet, when p
// is IPv6 with TCP as its first next header (no extension headers), its
// payload length matches len(p) and the TCP data offset is sane.
func tcp6Header(p []byte) (int, bool) {
	if len(p) < header.IPv6MinimumSize+header.TCPMinimumSize || p[0]>>4 != 6 ||
		p[6] != uint8(header.TCPProtocolNumber) ||
		int(binary.BigEndian.Uint16(p[4:6])) != len(p)-header.IPv6MinimumSize {
		return 0, false
	}
	thl := int(p[header.IPv6MinimumSize+12]>>4) * 4
	if thl < header.TCPMinimumSize || len(p) < header.IPv6MinimumSize+thl {
		return 0, false
	}
	return thl, true
}

// tcp6Pseudo is the checksum of the IPv6 pseudo-header of p (RFC 8200
// 8.1: addresses, the given upper-layer length, TCP). The addresses are
// adjacent in the header: one sum.
func tcp6Pseudo(p []byte, length int) uint16 {
	return tcp6PseudoLen(checksum.Checksum(p[8:40], 0), length)
}

// tcp6PseudoLen adds the length and next header to the addresses' sum.
func tcp6PseudoLen(addrs uint16, length int) uint16 {
	return checksum.Combine(checksum.Combine(addrs, uint16(length)), uint16(header.TCPProtocolNumber))
}

// tcp6ChecksumValid reports whether p (tcp6Header ok) carries a correct
// TCP checksum.
func tcp6ChecksumValid(p []byte) bool {
	return checksum.Checksum(p[header.IPv6MinimumSize:], tcp6Pseudo(p, len(p)-header.IPv6MinimumSize)) == 0xffff
}

// superPacket is a packet of the overlay stack's TCP being cut into
// segments by Read.
type superPacket struct {
	p     []byte // IPv6 + TCP (tcp6Header ok), checksum partial or full
	thl   int    // TCP header length
	addrs uint16 // checksum of the addresses (for each segment's pseudo-header)
	mss   int    // payload bytes per segment, > 0
	off   int    // payload bytes already cut
	cut   bool   // at least one segment cut
}

// newSuperPacket prepares p for cutting into segments of at most mtu
// bytes, with at most mss payload bytes each (gVisor's GSO MSS, 0 when
// unknown). It fails for packets that are not IPv6 TCP without extension
// headers, or whose headers leave no room for payload in mtu.
func newSuperPacket(p []byte, mss, mtu int) (superPacket, bool) {
	thl, ok := tcp6Header(p)
	if !ok {
		return superPacket{}, false
	}
	room := mtu - header.IPv6MinimumSize - thl
	if mss <= 0 || mss > room {
		mss = room
	}
	if mss <= 0 {
		return superPacket{}, false
	}
	return superPacket{p: p, thl: thl, mss: mss, addrs: checksum.Checksum(p[8:40], 0)}, true
}

// done reports whether every segment has been cut.
func (s *superPacket) done() bool {
	return s.cut && s.off >= len(s.p)-header.IPv6MinimumSize-s.thl
}

// next cuts the next segment into dst and returns its length, or 0 when
// dst is too small for it. Each segment is a packet of its own: the IPv6
// payload length of its size, the sequence number advanced by the payload
// before it, FIN and PSH only on the last segment, CWR only on the first
// (as a NIC's TSO does), and a full TCP checksum.
func (s *superPacket) next(dst []byte) int {
	hdr := header.IPv6MinimumSize + s.thl
	payload := s.p[hdr:]
	n := min(s.mss, len(payload)-s.off)
	if len(dst) < hdr+n {
		return 0
	}
	copy(dst, s.p[:hdr])
	copy(dst[hdr:], payload[s.off:s.off+n])
	seg := dst[:hdr+n]
	binary.BigEndian.PutUint16(seg[4:6], uint16(s.thl+n))
	tcp := header.TCP(seg[header.IPv6MinimumSize:])
	tcp.SetSequenceNumber(tcp.SequenceNumber() + uint32(s.off))
	flags := tcp.Flags()
	if s.off+n < len(payload) {
		flags &^= header.TCPFlagFin | header.TCPFlagPsh
	}
	if s.off > 0 {
		flags &^= header.TCPFlagCwr
	}
	tcp.SetFlags(uint8(flags))
	tcp.SetChecksum(0)
	tcp.SetChecksum(^checksum.Checksum(seg[header.IPv6MinimumSize:], tcp6PseudoLen(s.addrs, s.thl+n)))
	s.off += n
	s.cut = true
	return hdr + n
}
