package tun

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// VnetHdrLen is the size of struct virtio_net_hdr, the header that precedes
// every packet on a ModeOffload fd.
const VnetHdrLen = 10

// VnetHdr flags and GSO types (linux/virtio_net.h).
const (
	VnetFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	VnetFlagDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID

	VnetGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	VnetGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	VnetGSOUDP   = 3    // VIRTIO_NET_HDR_GSO_UDP
	VnetGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	VnetGSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4
	VnetGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN
)

// VnetHdr is struct virtio_net_hdr. On a TUN its fields are in the host's
// byte order unless TUNSETVNETLE/BE says otherwise; this package never sets
// either, and encodes little-endian, which is the host's order on every
// platform tunmesh ships for (amd64, arm64).
type VnetHdr struct {
	Flags uint8
	// GSOType is VnetGSONone for a single packet, else the kind of
	// super-packet (VnetGSOTCPv4 or VnetGSOTCPv6, possibly with VnetGSOECN).
	GSOType uint8
	// HdrLen is the length of the headers (IP + TCP) repeated in every
	// segment. The kernel's value is a hint; readers recompute it.
	HdrLen uint16
	// GSOSize is the payload size of each segment but the last.
	GSOSize uint16
	// CsumStart and CsumOffset locate the checksum to complete when
	// Flags has VnetFlagNeedsCsum: the one's complement sum of the bytes
	// from CsumStart to the end goes at CsumStart+CsumOffset; the field
	// already holds the pseudo-header sum.
	CsumStart  uint16
	CsumOffset uint16
}

// ErrVnetHdr is wrapped by DecodeVnetHdr's errors.
var ErrVnetHdr = errors.New("bad virtio net header")

// DecodeVnetHdr reads the header at the start of b. It checks only that b is
// long enough; what the fields mean for the packet that follows is for the
// caller to validate (a pod can write any header through a packet socket).
func DecodeVnetHdr(b []byte) (VnetHdr, error) {
	if len(b) < VnetHdrLen {
		return VnetHdr{}, fmt.Errorf("%w: %d bytes, want %d", ErrVnetHdr, len(b), VnetHdrLen)
	}
	return VnetHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}, nil
}

// Encode writes h into the first VnetHdrLen bytes of b, which must be long
// enough.
func (h VnetHdr) Encode(b []byte) {
	_ = b[VnetHdrLen-1]
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
}
