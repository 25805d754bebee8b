package netstack

import (
	"encoding/binary"
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tunmesh/tunmesh/netstack/tun"
)

// minGSOSize is the smallest segment size Linux's TCP uses (TCP_MIN_SND_MSS,
// the floor of net.ipv4.tcp_min_snd_mss). A smaller one is not the pod's
// kernel, and would make cutting a 64 KiB super-packet cost up to 64 Ki
// writes.
const minGSOSize = 48

// offload is what a packet read from a ModeOffload TUN carries besides its
// bytes, once checkOffload has validated it against the packet.
type offload struct {
	// csum: the checksum at csumStart+csumOffset is partial (it holds the
	// pseudo-header sum; the bytes from csumStart on are not summed yet).
	csum                  bool
	csumStart, csumOffset int
	// gso: the packet is a TCP super-packet to be cut into segments of mss
	// payload bytes (csum is then set too, over TCP).
	gso bool
	mss int
}

// Reasons checkOffload refuses a packet. A pod's kernel never produces these;
// a pod with CAP_NET_RAW can (a packet socket with PACKET_VNET_HDR on tm0),
// so they are dropped, never interpreted.
var (
	errOffloadKind  = errors.New("offload: not a TCP super-packet kind")
	errOffloadCsum  = errors.New("offload: checksum location outside the packet")
	errOffloadShape = errors.New("offload: super-packet does not match its header")
)

// checkOffload validates the offload state the reader put in g (vnetToGSO)
// against the packet it came with (info, parsed from its first bytes; size
// bytes long). Super-packets must be unfragmented TCP of the header's IP
// version, neither SYN nor RST (Linux segments neither; so every segment of
// a super-packet carries the same 4-tuple and the flags that matter to the
// classifier, and deciding the super-packet decides each segment), with a
// partial TCP checksum where TCP's is, a TCP header inside the packet and a
// segment size the kernel could use (minGSOSize).
func checkOffload(g stack.GSO, info *packetInfo, size int) (offload, error) {
	var o offload
	if g.NeedsCsum {
		o.csum = true
		o.csumStart, o.csumOffset = int(g.L3HdrLen), int(g.CsumOffset)
		if o.csumStart < info.ipHdrLen || o.csumStart+o.csumOffset+2 > size {
			return offload{}, errOffloadCsum
		}
	}
	switch g.Type {
	case stack.GSONone:
		return o, nil
	case stack.GSOTCPv4, stack.GSOTCPv6:
	default:
		return offload{}, errOffloadKind
	}
	wantVersion := uint8(4)
	if g.Type == stack.GSOTCPv6 {
		wantVersion = 6
	}
	if !info.tcp || info.version != wantVersion || info.flags&(tcpFlagSYN|tcpFlagRST) != 0 ||
		!o.csum || o.csumStart != info.ipHdrLen || o.csumOffset != 16 || g.MSS < minGSOSize ||
		info.tcpHdrLen < tcpHdrMin || info.ipHdrLen+info.tcpHdrLen > size {
		return offload{}, errOffloadShape
	}
	o.gso = true
	o.mss = int(g.MSS)
	return o, nil
}

// vnetHdr is the virtio header that hands a packet with offload state o on
// to another ModeOffload TUN unchanged (the host TUN). It is built from the
// validated state, never copied from the pod's header.
func (o offload) vnetHdr(info *packetInfo) tun.VnetHdr {
	var h tun.VnetHdr
	if o.csum {
		h.Flags = tun.VnetFlagNeedsCsum
		h.CsumStart = uint16(o.csumStart)
		h.CsumOffset = uint16(o.csumOffset)
	}
	if o.gso {
		h.GSOType = tun.VnetGSOTCPv4
		if info.version == 6 {
			h.GSOType = tun.VnetGSOTCPv6
		}
		h.GSOSize = uint16(o.mss)
		h.HdrLen = uint16(info.ipHdrLen + info.tcpHdrLen)
	}
	return h
}

// tcpDataOffset is the TCP header length of the packet b, or 0.
func tcpDataOffset(b []byte, ipHdrLen int) int {
	if len(b) < ipHdrLen+tcpHdrMin {
		return 0
	}
	return int(b[ipHdrLen+12]>>4) * 4
}

// finishChecksum completes a partial checksum in place, as the kernel's
// skb_checksum_help does: the field already holds the pseudo-header sum, so
// the checksum is the complement of the sum from start to the end. The
// caller has checked the location (checkOffload).
func finishChecksum(b []byte, start, offset int) {
	at := start + offset
	c := ^checksum.Checksum(b[start:], 0)
	if c == 0 {
		// As the kernel does (CSUM_MANGLED_0): a zero UDP checksum
		// means "none"; 0xffff is the same sum for TCP.
		c = 0xffff
	}
	binary.BigEndian.PutUint16(b[at:], c)
}

// segmentTCP cuts the TCP super-packet b (validated by checkOffload: IP
// header of info.ipHdrLen bytes, TCP header, payload) into segments of at
// most mss payload bytes, as the kernel's TSO does, and calls emit with each
// one; emit must not keep it. Every segment gets the headers of b with its
// own lengths, sequence number, IPv4 ID and complete checksums; FIN and PSH
// stay on the last segment only, CWR on the first only. It returns the
// number of segments, or an error if b is not shaped as a super-packet or
// emit fails (remaining segments are not emitted).
func segmentTCP(b []byte, info *packetInfo, mss int, scratch []byte, emit func([]byte) error) (int, error) {
	ipHL := info.ipHdrLen
	tcpHL := tcpDataOffset(b, ipHL)
	hdrLen := ipHL + tcpHL
	if mss <= 0 || tcpHL < tcpHdrMin || hdrLen > len(b) {
		return 0, errOffloadShape
	}
	payload := b[hdrLen:]
	seq := binary.BigEndian.Uint32(b[ipHL+4:])
	var id uint16
	if info.version == 4 {
		id = binary.BigEndian.Uint16(b[4:])
	}
	flags := b[ipHL+tcpFlagsOff]
	n := 0
	for off := 0; off < len(payload) || (off == 0 && len(payload) == 0); off += mss {
		end := min(off+mss, len(payload))
		segLen := hdrLen + end - off
		seg := append(scratch[:0], b[:hdrLen]...)
		seg = append(seg, payload[off:end]...)
		scratch = seg
		t := seg[ipHL:]
		binary.BigEndian.PutUint32(t[4:], seq+uint32(off))
		f := flags
		if end < len(payload) {
			f &^= tcpFlagFIN | tcpFlagPSH
		}
		if off > 0 {
			f &^= tcpFlagCWR
		}
		t[tcpFlagsOff] = f
		var pseudo uint16
		if info.version == 4 {
			binary.BigEndian.PutUint16(seg[2:], uint16(segLen))
			binary.BigEndian.PutUint16(seg[4:], id+uint16(n))
			seg[10], seg[11] = 0, 0
			binary.BigEndian.PutUint16(seg[10:], ^checksum.Checksum(seg[:ipHL], 0))
			pseudo = pseudoSum(seg[12:20], len(t))
		} else {
			binary.BigEndian.PutUint16(seg[4:], uint16(segLen-ipHL))
			pseudo = pseudoSum(seg[8:40], len(t))
		}
		t[16], t[17] = 0, 0
		binary.BigEndian.PutUint16(t[16:], ^checksum.Checksum(t, pseudo))
		if err := emit(seg); err != nil {
			return n, err
		}
		n++
		if len(payload) == 0 {
			break
		}
	}
	return n, nil
}

// pseudoSum is the one's complement sum of the TCP pseudo-header: addrs is
// source and destination address back to back (as in the IP header).
func pseudoSum(addrs []byte, l4len int) uint16 {
	var lp [4]byte
	binary.BigEndian.PutUint16(lp[0:], protoTCP)
	binary.BigEndian.PutUint16(lp[2:], uint16(l4len))
	return checksum.Checksum(lp[:], checksum.Checksum(addrs, 0))
}
