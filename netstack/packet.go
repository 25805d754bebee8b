package netstack

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// IP protocol numbers and TCP flags the classifier looks at.
const (
	protoTCP    = 6
	protoFrag6  = 44
	tcpFlagFIN  = 0x01
	tcpFlagSYN  = 0x02
	tcpFlagRST  = 0x04
	tcpFlagPSH  = 0x08
	tcpFlagACK  = 0x10
	tcpFlagCWR  = 0x80
	tcpOptEnd   = 0
	tcpOptNOP   = 1
	tcpOptMSS   = 2
	tcpMSSLen   = 4
	ipv4HdrMin  = 20
	ipv6HdrLen  = 40
	tcpHdrMin   = 20
	tcpFlagsOff = 13

	// maxHeaderPullUp is how many leading bytes of a packet the classifier
	// needs at most: a 60-byte IPv4 header plus the first 20 bytes of TCP.
	maxHeaderPullUp = 60 + tcpHdrMin

	// ipv4Overhead and ipv6Overhead turn an MTU into an MSS, like the
	// kernel's TCPMSS --clamp-mss-to-pmtu (IP + TCP headers, no options).
	ipv4Overhead = ipv4HdrMin + tcpHdrMin
	ipv6Overhead = ipv6HdrLen + tcpHdrMin
)

var (
	errShort   = errors.New("packet too short")
	errVersion = errors.New("not an IPv4 or IPv6 packet")
	errHeader  = errors.New("bad IP header length")
)

// packetInfo is what the classifier needs from the start of an IP packet.
type packetInfo struct {
	version  uint8 // 4 or 6
	proto    uint8 // IPv4 protocol or IPv6 next header
	ipHdrLen int
	src, dst netip.Addr
	// fragment is set for any IPv4 fragment and for IPv6 packets with a
	// fragment header; those carry no reliable ports.
	fragment bool
	// tcp is set when proto is TCP, the packet is not a fragment and the
	// ports and flags below were read.
	tcp          bool
	sport, dport uint16
	flags        uint8
	// tcpHdrLen is the TCP header length from its data offset (not
	// checked against the packet's length here).
	tcpHdrLen int
}

// isPureSYN reports a TCP SYN without ACK: the first packet of a new flow.
func (p *packetInfo) isPureSYN() bool {
	return p.tcp && p.flags&(tcpFlagSYN|tcpFlagACK|tcpFlagRST) == tcpFlagSYN
}

// parseIP reads the IP header and, for unfragmented TCP, the ports and flags
// from b, the leading bytes of a packet (at least maxHeaderPullUp of them
// when the packet is that long). IPv6 extension headers other than a
// fragment header are not walked: such packets are reported as non-TCP and
// are therefore passed through.
func parseIP(b []byte) (packetInfo, error) {
	var p packetInfo
	if len(b) < 1 {
		return p, errShort
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < ipv4HdrMin {
			return p, errShort
		}
		hl := int(b[0]&0x0f) * 4
		if hl < ipv4HdrMin {
			return p, errHeader
		}
		if len(b) < hl {
			return p, errShort
		}
		p.version = 4
		p.ipHdrLen = hl
		p.proto = b[9]
		p.src = netip.AddrFrom4([4]byte(b[12:16]))
		p.dst = netip.AddrFrom4([4]byte(b[16:20]))
		fragField := binary.BigEndian.Uint16(b[6:8])
		p.fragment = fragField&0x3fff != 0 // MF flag or a fragment offset
	case 6:
		if len(b) < ipv6HdrLen {
			return p, errShort
		}
		p.version = 6
		p.ipHdrLen = ipv6HdrLen
		p.proto = b[6]
		p.src = netip.AddrFrom16([16]byte(b[8:24]))
		p.dst = netip.AddrFrom16([16]byte(b[24:40]))
		p.fragment = p.proto == protoFrag6
	default:
		return p, errVersion
	}
	if p.proto == protoTCP && !p.fragment && len(b) >= p.ipHdrLen+tcpFlagsOff+1 {
		t := b[p.ipHdrLen:]
		p.tcp = true
		p.sport = binary.BigEndian.Uint16(t[0:2])
		p.dport = binary.BigEndian.Uint16(t[2:4])
		p.flags = t[tcpFlagsOff]
		p.tcpHdrLen = int(t[12]>>4) * 4
	}
	return p, nil
}

// mssLimit is the largest MSS a passthrough SYN or SYN-ACK may advertise for
// an underlay MTU, or 0 when clamping is off.
func mssLimit(underlayMTU int, version uint8) uint16 {
	overhead := ipv4Overhead
	if version == 6 {
		overhead = ipv6Overhead
	}
	if underlayMTU <= overhead {
		return 0
	}
	return uint16(min(underlayMTU-overhead, 0xffff))
}

// ClampMSS lowers the MSS option of the TCP segment in pkt (a whole IP
// packet whose IP header is ipHdrLen bytes) to at most limit, and fixes the
// TCP checksum incrementally (RFC 1624), so a correct checksum stays correct
// and nothing else in the packet changes. It reports whether it changed pkt.
// A segment without an MSS option, or with a malformed option list, is left
// alone.
func ClampMSS(pkt []byte, ipHdrLen int, limit uint16) bool {
	if limit == 0 || ipHdrLen < 0 || len(pkt) < ipHdrLen+tcpHdrMin {
		return false
	}
	t := pkt[ipHdrLen:]
	dataOff := int(t[12]>>4) * 4
	if dataOff <= tcpHdrMin || dataOff > len(t) {
		return false
	}
	for i := tcpHdrMin; i < dataOff; {
		kind := t[i]
		switch kind {
		case tcpOptEnd:
			return false
		case tcpOptNOP:
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
		if kind != tcpOptMSS {
			i += optLen
			continue
		}
		if optLen != tcpMSSLen {
			return false
		}
		at := i + 2 // offset of the 16-bit value within the TCP header
		old := binary.BigEndian.Uint16(t[at:])
		if old <= limit {
			return false
		}
		binary.BigEndian.PutUint16(t[at:], limit)
		oldW, newW := old, limit
		if at%2 == 1 {
			// A field at an odd offset adds its bytes swapped to the
			// 16-bit one's complement sum (RFC 1071, byte order
			// independence).
			oldW, newW = swap16(old), swap16(limit)
		}
		sum := binary.BigEndian.Uint16(t[16:18])
		binary.BigEndian.PutUint16(t[16:18], checksumUpdate(sum, oldW, newW))
		return true
	}
	return false
}

// checksumUpdate returns the Internet checksum hc after a 16-bit word of the
// summed data changed from old to new: HC' = ~(~HC + ~m + m') (RFC 1624 eq. 3).
func checksumUpdate(hc, old, new uint16) uint16 {
	s := uint32(^hc) + uint32(^old) + uint32(new)
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func swap16(v uint16) uint16 { return v<<8 | v>>8 }
