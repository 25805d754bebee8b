package wireguard

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const (
	testSrc6 = "fd74:6d77:67::a00:1"
	testDst6 = "fd74:6d77:67::a00:2"
)

// tsOption is a TCP timestamp option (NOP, NOP, kind 8), as gVisor sends
// on every segment of a connection that negotiated it.
var tsOption = []byte{1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78}

// tcp6Packet builds an IPv6 TCP packet. With full, its checksum is
// correct; otherwise it holds garbage, as a GSO packet's partial checksum
// is for the segmenter.
func tcp6Packet(src, dst string, sport, dport uint16, seq, ack uint32, flags header.TCPFlags, opts, payload []byte, full bool) []byte {
	thl := header.TCPMinimumSize + len(opts)
	b := make([]byte, header.IPv6MinimumSize+thl+len(payload))
	header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(thl + len(payload)), TransportProtocol: header.TCPProtocolNumber,
		HopLimit: 64, SrcAddr: tcpipAddr(src), DstAddr: tcpipAddr(dst)})
	tcp := header.TCP(b[header.IPv6MinimumSize:])
	tcp.Encode(&header.TCPFields{SrcPort: sport, DstPort: dport, SeqNum: seq, AckNum: ack, DataOffset: uint8(thl),
		Flags: flags, WindowSize: 512})
	copy(tcp[header.TCPMinimumSize:], opts)
	copy(tcp[thl:], payload)
	if full {
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipAddr(src), tcpipAddr(dst), uint16(thl+len(payload)))
		tcp.SetChecksum(^checksum.Checksum(tcp, xsum))
	} else {
		tcp.SetChecksum(0xbeef)
	}
	return b
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

// checkSegment parses seg as gVisor's IPv6 and TCP layers would and
// returns its TCP header and payload; the checksum is checked with
// gVisor's header code, not this package's.
func checkSegment(t *testing.T, seg []byte, mtu int) (header.TCP, []byte) {
	t.Helper()
	if len(seg) > mtu {
		t.Fatalf("segment of %d bytes over the MTU %d", len(seg), mtu)
	}
	ip := header.IPv6(seg)
	if !ip.IsValid(len(seg)) || int(ip.PayloadLength()) != len(seg)-header.IPv6MinimumSize || ip.TransportProtocol() != header.TCPProtocolNumber {
		t.Fatalf("not a valid IPv6 TCP packet: payload length %d of %d bytes", ip.PayloadLength(), len(seg))
	}
	tcp := header.TCP(ip.Payload())
	if len(tcp) < header.TCPMinimumSize || int(tcp.DataOffset()) < header.TCPMinimumSize || int(tcp.DataOffset()) > len(tcp) {
		t.Fatal("invalid TCP header")
	}
	payload := tcp[tcp.DataOffset():]
	if !tcp.IsChecksumValid(ip.SourceAddress(), ip.DestinationAddress(), checksum.Checksum(payload, 0), uint16(len(payload))) {
		t.Fatal("bad TCP checksum")
	}
	return tcp, payload
}

// TestSuperPacketSegments: a large packet of the overlay stack cut into
// inner-MTU segments: each parses and verifies, the sequence numbers
// follow the payload, PSH and FIN only on the last segment and CWR only on
// the first, everything else as in the original, and the payloads put
// together are the original payload.
func TestSuperPacketSegments(t *testing.T) {
	const mtu = DefaultMTU
	for _, tc := range []struct {
		name     string
		payload  int
		mss      int // gVisor's GSO MSS (0: unknown)
		opts     []byte
		flags    header.TCPFlags
		segments int
	}{
		{"64k with timestamps", 65000, 1348, tsOption, header.TCPFlagAck | header.TCPFlagPsh, 49},
		{"exact multiple", 3 * 1348, 1348, tsOption, header.TCPFlagAck, 3},
		{"odd tail", 2*1000 + 333, 1000, nil, header.TCPFlagAck | header.TCPFlagPsh, 3},
		{"fin on the last", 5000, 1360, nil, header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin, 4},
		{"cwr on the first", 4000, 1360, nil, header.TCPFlagAck | header.TCPFlagCwr, 3},
		{"fits: checksum completed", 1000, 1348, tsOption, header.TCPFlagAck, 1},
		{"pure ack", 0, 1348, tsOption, header.TCPFlagAck, 1},
		{"mss unknown: the MTU decides", 5000, 0, nil, header.TCPFlagAck, 4},
		{"mss over the MTU: the MTU decides", 5000, 9000, nil, header.TCPFlagAck, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := pattern(tc.payload)
			const seq0, ack = 0xfffff000, 77 // the sequence numbers wrap
			p := tcp6Packet(testSrc6, testDst6, 4143, 40000, seq0, ack, tc.flags, tc.opts, data, false)
			sp, ok := newSuperPacket(p, tc.mss, mtu)
			if !ok {
				t.Fatal("not segmentable")
			}
			var got []byte
			n := 0
			for !sp.done() {
				buf := make([]byte, 2000)
				size := sp.next(buf)
				if size == 0 {
					t.Fatal("no progress")
				}
				tcp, payload := checkSegment(t, buf[:size], mtu)
				if tcp.SequenceNumber() != seq0+uint32(len(got)) {
					t.Fatalf("segment %d: seq %#x, want %#x", n, tcp.SequenceNumber(), seq0+uint32(len(got)))
				}
				got = append(got, payload...)
				last := len(got) == len(data)
				want := tc.flags
				if !last {
					want &^= header.TCPFlagPsh | header.TCPFlagFin
				}
				if n > 0 {
					want &^= header.TCPFlagCwr
				}
				if tcp.Flags() != want {
					t.Fatalf("segment %d: flags %s, want %s", n, tcp.Flags(), want)
				}
				if tcp.AckNumber() != ack || tcp.SourcePort() != 4143 || tcp.DestinationPort() != 40000 || tcp.WindowSize() != 512 ||
					!bytes.Equal(tcp[header.TCPMinimumSize:tcp.DataOffset()], tc.opts) {
					t.Fatalf("segment %d: header fields changed", n)
				}
				n++
			}
			if n != tc.segments || !bytes.Equal(got, data) {
				t.Fatalf("%d segments carrying %d bytes, want %d carrying %d (equal: %v)", n, len(got), tc.segments, len(data), bytes.Equal(got, data))
			}
		})
	}
}

func TestSuperPacketRefuses(t *testing.T) {
	good := tcp6Packet(testSrc6, testDst6, 1, 2, 0, 0, header.TCPFlagAck, nil, pattern(3000), false)
	udp := append([]byte(nil), good...)
	udp[6] = 17
	ext := append([]byte(nil), good...)
	ext[6] = 0 // hop-by-hop options first
	badLen := append([]byte(nil), good...)
	binary.BigEndian.PutUint16(badLen[4:6], 100)
	badOff := append([]byte(nil), good...)
	badOff[header.IPv6MinimumSize+12] = 4 << 4
	v4 := ipv4Packet("10.0.0.1", "10.0.0.2", 3000)
	for name, p := range map[string][]byte{"udp": udp, "extension header": ext, "payload length": badLen,
		"data offset": badOff, "ipv4": v4, "short": good[:50]} {
		if _, ok := newSuperPacket(p, 1348, DefaultMTU); ok {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, ok := newSuperPacket(good, 1348, header.IPv6MinimumSize+header.TCPMinimumSize); ok {
		t.Error("an MTU leaving no room for payload accepted")
	}
}

// TestTUNReadCutsAcrossBatches: Read cuts the overlay stack's large
// packets into the batch, continues in the next Read when the batch is
// full, and drops (counted) a GSO packet it cannot cut, whose checksum is
// only partial.
func TestTUNReadCutsAcrossBatches(t *testing.T) {
	tn := newTestTUN(t)
	data := pattern(5 * 1300)
	tn.out <- outPacket{b: tcp6Packet(testSrc6, testDst6, 1, 2, 1000, 0, header.TCPFlagAck|header.TCPFlagPsh, nil, data, false), gso: true, mss: 1300}
	udp := ipv4Packet("10.244.0.5", "10.244.1.7", 10)
	tn.out <- outPacket{b: ipv4Packet("10.244.0.5", "10.244.1.7", 3000), gso: true}
	tn.out <- outPacket{b: udp}
	const off = 16
	bufs := make([][]byte, 3)
	for i := range bufs {
		bufs[i] = make([]byte, off+DefaultMTU)
	}
	sizes := make([]int, 3)
	var got []byte
	var reads []int
	for len(reads) < 2 {
		n, err := tn.Read(bufs, sizes, off)
		if err != nil {
			t.Fatal(err)
		}
		reads = append(reads, n)
		for i := 0; i < n; i++ {
			p := bufs[i][off : off+sizes[i]]
			if p[0]>>4 == 4 {
				if !bytes.Equal(p, udp) || len(got) != len(data) {
					t.Fatalf("plain packet out of order or changed")
				}
				continue
			}
			_, payload := checkSegment(t, p, DefaultMTU)
			got = append(got, payload...)
		}
	}
	// The second batch: the last two segments, the IPv4 "GSO" packet
	// dropped, the plain packet.
	if fmt.Sprint(reads) != "[3 3]" || !bytes.Equal(got, data) {
		t.Fatalf("reads %v, %d of %d bytes", reads, len(got), len(data))
	}
	if s := tn.Stats(); s.Split != 4 || s.Dropped != 1 {
		t.Fatalf("stats %+v, want 4 split and the IPv4 GSO packet dropped", s)
	}
}

// FuzzSuperPacket: whatever the overlay stack (or a bug in it) hands
// over, cutting never panics, never loops, and what it accepts comes out
// as valid segments within the MTU carrying exactly the payload.
func FuzzSuperPacket(f *testing.F) {
	f.Add(tcp6Packet(testSrc6, testDst6, 1, 2, 5, 6, header.TCPFlagAck|header.TCPFlagPsh, tsOption, pattern(5000), false), uint16(1348))
	f.Add(tcp6Packet(testSrc6, testDst6, 1, 2, 5, 6, header.TCPFlagAck, nil, nil, false), uint16(0))
	f.Add([]byte{0x60, 0, 0, 0, 0, 20, 6, 64}, uint16(1))
	f.Fuzz(func(t *testing.T, p []byte, mss uint16) {
		const mtu = 1280
		sp, ok := newSuperPacket(p, int(mss), mtu)
		if !ok {
			return
		}
		thl, _ := tcp6Header(p)
		var got []byte
		for i := 0; !sp.done(); i++ {
			if i > len(p) {
				t.Fatal("no end")
			}
			buf := make([]byte, mtu)
			size := sp.next(buf)
			if size == 0 {
				t.Fatal("a segment does not fit the MTU")
			}
			_, payload := checkSegment(t, buf[:size], mtu)
			got = append(got, payload...)
		}
		if !bytes.Equal(got, p[header.IPv6MinimumSize+thl:]) {
			t.Fatal("payload changed")
		}
	})
}
