package wireguard

import (
	"encoding/binary"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestFragNeeded(t *testing.T) {
	big := ipv4Packet("10.244.1.2", "10.244.2.2", 1480-header.IPv4MinimumSize)
	setDF := func(p []byte) []byte {
		q := append([]byte(nil), p...)
		ip := header.IPv4(q)
		ip.SetFlagsFragmentOffset(header.IPv4FlagDontFragment, 0)
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		return q
	}
	if fragNeeded(big, DefaultMTU) != nil {
		t.Fatal("answered a packet without DF (it may be fragmented)")
	}
	if fragNeeded(setDF(ipv4Packet("10.244.1.2", "10.244.2.2", 100)), DefaultMTU) != nil {
		t.Fatal("answered a packet that fits")
	}
	pkt := setDF(big)
	icmp := fragNeeded(pkt, DefaultMTU)
	if icmp == nil {
		t.Fatal("no answer to an oversize DF packet")
	}
	ip := header.IPv4(icmp)
	if !ip.IsValid(len(icmp)) || ip.CalculateChecksum() != 0xffff {
		t.Fatal("invalid IP header")
	}
	if ip.SourceAddress() != tcpipAddr("10.244.2.2") || ip.DestinationAddress() != tcpipAddr("10.244.1.2") || ip.Protocol() != 1 {
		t.Fatalf("ICMP from %s to %s proto %d", ip.SourceAddress(), ip.DestinationAddress(), ip.Protocol())
	}
	m := icmp[20:]
	if m[0] != 3 || m[1] != 4 || binary.BigEndian.Uint16(m[6:8]) != DefaultMTU || inetChecksum(m) != 0 {
		t.Fatalf("ICMP type %d code %d mtu %d checksum ok %v", m[0], m[1], binary.BigEndian.Uint16(m[6:8]), inetChecksum(m) == 0)
	}
	if string(m[8:]) != string(pkt[:28]) {
		t.Fatal("the quote is not the packet's header and first 8 bytes")
	}
	// An ICMP error is never answered with one.
	icmpErr := setDF(ipv4Packet("10.244.1.2", "10.244.2.2", 1480-header.IPv4MinimumSize))
	icmpErr[9] = 1
	icmpErr[20] = 3
	if fragNeeded(icmpErr, DefaultMTU) != nil {
		t.Fatal("answered an ICMP error")
	}
}

func FuzzFragNeeded(f *testing.F) {
	f.Add(ipv4Packet("10.244.1.2", "10.244.2.2", 1500), 1420)
	f.Add([]byte{0x4f}, 1280)
	f.Fuzz(func(t *testing.T, p []byte, mtu int) {
		if mtu < 576 || mtu > 65535 {
			return
		}
		out := fragNeeded(p, mtu)
		if out != nil && (len(p) <= mtu || inetChecksum(out[:20]) != 0 || inetChecksum(out[20:]) != 0) {
			t.Fatalf("bad answer for %d bytes at mtu %d", len(p), mtu)
		}
	})
}
