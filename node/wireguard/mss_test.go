package wireguard

import (
	"encoding/binary"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// synPacket is an IPv4 TCP segment with the given flags and options and a
// correct checksum.
func synPacket(flags header.TCPFlags, opts []byte) []byte {
	tcpLen := header.TCPMinimumSize + len(opts)
	b := make([]byte, header.IPv4MinimumSize+tcpLen)
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: 6,
		SrcAddr: tcpipAddr("10.244.2.4"), DstAddr: tcpipAddr("10.244.1.2")})
	ip.SetChecksum(^ip.CalculateChecksum())
	tcp := header.TCP(b[header.IPv4MinimumSize:])
	tcp.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 9000, SeqNum: 1, DataOffset: uint8(tcpLen), Flags: flags, WindowSize: 64240})
	copy(tcp[header.TCPMinimumSize:], opts)
	tcp.SetChecksum(^tcp.CalculateChecksum(header.PseudoHeaderChecksum(6, ip.SourceAddress(), ip.DestinationAddress(), uint16(tcpLen))))
	return b
}

func tcpChecksumOK(p []byte) bool {
	ip := header.IPv4(p)
	tcp := header.TCP(p[ip.HeaderLength():])
	xsum := header.PseudoHeaderChecksum(6, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(tcp)))
	return checksum.Checksum(tcp, xsum) == 0xffff
}

func TestClampSYN(t *testing.T) {
	mss := func(v uint16) []byte { return []byte{2, 4, byte(v >> 8), byte(v)} }
	for _, tc := range []struct {
		name    string
		flags   header.TCPFlags
		opts    []byte
		want    uint16 // MSS after; 0: no MSS option expected to change
		changed bool
	}{
		{"syn 1460", header.TCPFlagSyn, mss(1460), 1380, true},
		{"syn-ack 1460", header.TCPFlagSyn | header.TCPFlagAck, mss(1460), 1380, true},
		{"syn small", header.TCPFlagSyn, mss(1200), 1200, false},
		{"odd offset", header.TCPFlagSyn, append([]byte{1}, append(mss(8960), 1, 1, 1)...), 1380, true},
		{"not syn", header.TCPFlagAck, mss(1460), 1460, false},
		{"no mss", header.TCPFlagSyn, []byte{1, 1, 1, 1}, 0, false},
		{"bad option length", header.TCPFlagSyn, []byte{3, 9, 0, 0}, 0, false},
	} {
		p := synPacket(tc.flags, tc.opts)
		if got := clampSYN(p, DefaultMTU); got != tc.changed {
			t.Errorf("%s: changed %v", tc.name, got)
		}
		if !tcpChecksumOK(p) {
			t.Errorf("%s: TCP checksum broken", tc.name)
		}
		if tc.want != 0 {
			opts := p[header.IPv4MinimumSize+header.TCPMinimumSize:]
			i := 0
			for opts[i] == 1 {
				i++
			}
			if got := binary.BigEndian.Uint16(opts[i+2:]); got != tc.want {
				t.Errorf("%s: MSS %d, want %d", tc.name, got, tc.want)
			}
		}
	}
	udp := ipv4Packet("10.244.2.4", "10.244.1.2", 40)
	if clampSYN(udp, DefaultMTU) {
		t.Error("UDP changed")
	}
}

func FuzzClampSYN(f *testing.F) {
	f.Add(synPacket(header.TCPFlagSyn, []byte{2, 4, 5, 180}), 1420)
	f.Add([]byte{0x45}, 1420)
	f.Add(make([]byte, 60), 1280)
	f.Fuzz(func(t *testing.T, p []byte, mtu int) {
		before := append([]byte(nil), p...)
		changed := clampSYN(p, mtu)
		if !changed && string(before) != string(p) {
			t.Fatal("reported unchanged but changed")
		}
		if changed && len(p) != len(before) {
			t.Fatal("length changed")
		}
	})
}
