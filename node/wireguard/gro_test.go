package wireguard

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// deliveryRecorder stands in for the overlay stack's NIC.
type deliveryRecorder struct {
	pkts      [][]byte
	validated []bool
}

func (r *deliveryRecorder) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	r.pkts = append(r.pkts, pkt.ToView().AsSlice())
	r.validated = append(r.validated, pkt.RXChecksumValidated)
}

func (r *deliveryRecorder) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// seg is one TCP segment of a test flow to the overlay address.
type seg struct {
	flow  uint16 // source port
	seq   uint32 // in payload units of segSize
	n     int    // payload bytes (default segSize)
	flags header.TCPFlags
	ack   uint32
	bad   bool // checksum broken
}

const segSize = 1348

func (s seg) packet(dst string) []byte {
	n := s.n
	if n == 0 {
		n = segSize
	} else if n < 0 {
		n = 0
	}
	flags := s.flags
	if flags == 0 {
		flags = header.TCPFlagAck
	}
	payload := bytes.Repeat([]byte{byte(s.flow), byte(s.seq)}, n/2+1)[:n]
	p := tcp6Packet(testSrc6, dst, s.flow, 4143, 1000+s.seq*segSize, 1+s.ack, flags, tsOption, payload, true)
	if s.bad {
		p[len(p)-1] ^= 0xff
	}
	return p
}

// want is one delivered packet: the flow, the segments merged into it
// (first seq, count) and its flags.
type want struct {
	flow  uint16
	seq   uint32
	segs  int
	flags header.TCPFlags
}

// TestTUNWriteCoalesces: Write's GRO merges consecutive in-order segments
// of a flow and keeps everything else apart and in order; a segment with a
// bad checksum is dropped, never merged into a good one; only TCP right
// after the IPv6 header, ICMPv6 and "no next header" reach the stack.
func TestTUNWriteCoalesces(t *testing.T) {
	ack := header.TCPFlagAck
	for _, tc := range []struct {
		name    string
		in      []seg
		want    []want
		dropped uint64
	}{
		{"in order", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1}, {flow: 1, seq: 2}, {flow: 1, seq: 3}},
			[]want{{1, 0, 4, ack}}, 0},
		{"out of order", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1}, {flow: 1, seq: 3}, {flow: 1, seq: 2}},
			[]want{{1, 0, 2, ack}, {1, 3, 1, ack}, {1, 2, 1, ack}}, 0},
		{"mixed flows", []seg{{flow: 1, seq: 0}, {flow: 2, seq: 0}, {flow: 1, seq: 1}, {flow: 2, seq: 1}, {flow: 1, seq: 2}},
			[]want{{1, 0, 3, ack}, {2, 0, 2, ack}}, 0},
		{"psh ends a run", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, flags: ack | header.TCPFlagPsh}, {flow: 1, seq: 2}},
			[]want{{1, 0, 2, ack | header.TCPFlagPsh}, {1, 2, 1, ack}}, 0},
		{"fin in the middle", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, flags: ack | header.TCPFlagFin}, {flow: 1, seq: 2}},
			[]want{{1, 0, 2, ack | header.TCPFlagFin}, {1, 2, 1, ack}}, 0},
		{"rst not merged", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, flags: ack | header.TCPFlagRst}, {flow: 1, seq: 2}},
			[]want{{1, 0, 1, ack}, {1, 1, 1, ack | header.TCPFlagRst}, {1, 2, 1, ack}}, 0},
		{"urg not merged", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, flags: ack | header.TCPFlagUrg}, {flow: 1, seq: 2}},
			[]want{{1, 0, 1, ack}, {1, 1, 1, ack | header.TCPFlagUrg}, {1, 2, 1, ack}}, 0},
		{"ack changes", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, ack: 5}, {flow: 1, seq: 2, ack: 5}},
			[]want{{1, 0, 1, ack}, {1, 1, 2, ack}}, 0},
		{"bad checksum dropped, not merged", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, bad: true}, {flow: 1, seq: 2}},
			[]want{{1, 0, 1, ack}, {1, 2, 1, ack}}, 1},
		{"short segment ends a run", []seg{{flow: 1, seq: 0}, {flow: 1, seq: 1, n: 100}, {flow: 1, seq: 2}},
			[]want{{1, 0, 2, ack}, {1, 2, 1, ack}}, 0},
		{"pure acks apart", []seg{{flow: 1, seq: 0, n: -1}, {flow: 1, seq: 0, n: -1}},
			[]want{{1, 0, 1, ack}, {1, 0, 1, ack}}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tn := newTestTUN(t)
			rec := &deliveryRecorder{}
			tn.in = rec
			const off = 16
			var bufs [][]byte
			payloads := map[uint16][]byte{}
			for _, s := range tc.in {
				p := s.packet(tn.Overlay().String())
				bufs = append(bufs, append(make([]byte, off), p...))
				if !s.bad {
					payloads[s.flow] = append(payloads[s.flow], header.TCP(p[header.IPv6MinimumSize:]).Payload()...)
				}
			}
			if n, err := tn.Write(bufs, off); n != len(bufs) || err != nil {
				t.Fatalf("write %d %v", n, err)
			}
			if len(rec.pkts) != len(tc.want) {
				t.Fatalf("delivered %d packets, want %d", len(rec.pkts), len(tc.want))
			}
			got := map[uint16][]byte{}
			for i, w := range tc.want {
				p := rec.pkts[i]
				ip := header.IPv6(p)
				if !ip.IsValid(len(p)) {
					t.Fatalf("packet %d: invalid IPv6", i)
				}
				tcp := header.TCP(ip.Payload())
				payload := tcp.Payload()
				if tcp.SourcePort() != w.flow || tcp.SequenceNumber() != 1000+w.seq*segSize || tcp.Flags() != w.flags {
					t.Fatalf("packet %d: flow %d seq %d flags %s, want %+v", i, tcp.SourcePort(), tcp.SequenceNumber(), tcp.Flags(), w)
				}
				if segs := (len(payload) + segSize - 1) / segSize; len(payload) > 0 && segs != w.segs {
					t.Fatalf("packet %d: %d bytes, want %d segments", i, len(payload), w.segs)
				}
				if !rec.validated[i] {
					t.Fatalf("packet %d: checksum not marked verified", i)
				}
				got[w.flow] = append(got[w.flow], payload...)
			}
			for flow, p := range payloads {
				// Per flow the stack gets the good segments' bytes in the
				// order they came (out-of-order ones where they came).
				if !bytes.Equal(got[flow], p) {
					t.Fatalf("flow %d: payload differs", flow)
				}
			}
			s := tn.Stats()
			merged := uint64(len(tc.in)) - tc.dropped - uint64(len(tc.want))
			if s.Dropped != tc.dropped || s.Coalesced != merged || s.ToOverlay != uint64(len(tc.in))-tc.dropped {
				t.Fatalf("stats %+v, want %d dropped %d coalesced", s, tc.dropped, merged)
			}
		})
	}
}

// TestTUNWriteOverlayFilter: what is not TCP right after the IPv6 header,
// ICMPv6 or "no next header" never reaches the overlay stack (its NIC
// declares checksums verified: fragments and TCP behind extension headers
// could not be).
func TestTUNWriteOverlayFilter(t *testing.T) {
	tn := newTestTUN(t)
	rec := &deliveryRecorder{}
	tn.in = rec
	ov := tn.Overlay().String()
	withNext := func(nh uint8) []byte {
		p := seg{flow: 1}.packet(ov)
		p[6] = nh
		return p
	}
	echo := make([]byte, header.IPv6MinimumSize+header.ICMPv6EchoMinimumSize)
	header.IPv6(echo).Encode(&header.IPv6Fields{PayloadLength: header.ICMPv6EchoMinimumSize, TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: tcpipAddr(testSrc6), DstAddr: tcpipAddr(ov)})
	truncated := seg{flow: 1}.packet(ov)
	truncated = truncated[:len(truncated)-10]
	in := [][]byte{withNext(0), withNext(44), withNext(17), echo, truncated, seg{flow: 2}.packet(ov)}
	const off = 16
	var bufs [][]byte
	for _, p := range in {
		bufs = append(bufs, append(make([]byte, off), p...))
	}
	tn.Write(bufs, off)
	if len(rec.pkts) != 2 || !bytes.Equal(rec.pkts[0], echo) || header.TCP(rec.pkts[1][header.IPv6MinimumSize:]).SourcePort() != 2 {
		t.Fatalf("delivered %d packets, want the ICMPv6 echo and flow 2's segment", len(rec.pkts))
	}
	if rec.validated[0] {
		t.Fatal("ICMPv6 marked verified (gVisor checks it)")
	}
	if s := tn.Stats(); s.Dropped != 4 || s.ToOverlay != 2 {
		t.Fatalf("stats %+v", s)
	}
}
