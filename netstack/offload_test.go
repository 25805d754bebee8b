package netstack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tunmesh/tunmesh/netstack/tun"
)

// partial turns the complete packet pkt (from testPacket.bytes) into what a
// pod's kernel writes with checksum offload: the L4 checksum field holds only
// the pseudo-header sum (not complemented), as Linux's CHECKSUM_PARTIAL does.
func partial(pkt []byte, csumOffset int) []byte {
	info, err := parseIP(pkt)
	if err != nil {
		panic(err)
	}
	hl := info.ipHdrLen
	l4 := len(pkt) - hl
	ph := pseudoHeader(pkt, hl, info.proto, l4)
	binary.BigEndian.PutUint16(pkt[hl+csumOffset:], ^csum(ph))
	return pkt
}

// superPacket is a TSO super-packet as the pod's kernel hands it over: one
// IP/TCP header for the whole payload, IP lengths of the whole, a partial
// checksum, and its offload header.
func superPacket(tp testPacket) ([]byte, tun.VnetHdr) {
	b := partial(tp.bytes(), 16)
	h := tun.VnetHdr{
		Flags:      tun.VnetFlagNeedsCsum,
		GSOType:    tun.VnetGSOTCPv4,
		GSOSize:    1000,
		CsumStart:  20,
		CsumOffset: 16,
	}
	if tp.src.Addr().Is6() {
		h.GSOType = tun.VnetGSOTCPv6
		h.CsumStart = 40
	}
	h.HdrLen = h.CsumStart + 20 + uint16(len(tp.opts))
	return b, h
}

func infoOf(t testing.TB, b []byte) packetInfo {
	t.Helper()
	info, err := parseIP(b)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func TestCheckOffload(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), 3500)
	data4 := testPacket{src: pod4, dst: dst4, flags: tcpFlagACK, seq: 1, payload: payload}
	data6 := testPacket{src: pod6, dst: dst6, flags: tcpFlagACK, seq: 1, payload: payload}
	b4, h4 := superPacket(data4)
	b6, h6 := superPacket(data6)
	udp := partial(testPacket{src: pod4, dst: dst4, proto: 17, payload: []byte("dns")}.bytes(), 6)
	with := func(h tun.VnetHdr, f func(*tun.VnetHdr)) tun.VnetHdr { f(&h); return h }
	synData := testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, payload: payload}
	synB, synH := superPacket(synData)
	rstData := testPacket{src: pod4, dst: dst4, flags: tcpFlagRST | tcpFlagACK, payload: payload}
	rstB, rstH := superPacket(rstData)

	for _, tc := range []struct {
		name    string
		b       []byte
		h       tun.VnetHdr
		want    offload
		wantErr error
	}{
		{"plain", data4.bytes(), tun.VnetHdr{}, offload{}, nil},
		{"data-valid flag only", data4.bytes(), tun.VnetHdr{Flags: tun.VnetFlagDataValid}, offload{}, nil},
		{"partial tcp", partial(data4.bytes(), 16), tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 16}, offload{csum: true, csumStart: 20, csumOffset: 16}, nil},
		{"partial udp", udp, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 6}, offload{csum: true, csumStart: 20, csumOffset: 6}, nil},
		{"tso4", b4, h4, offload{csum: true, csumStart: 20, csumOffset: 16, gso: true, mss: 1000}, nil},
		{"tso6", b6, h6, offload{csum: true, csumStart: 40, csumOffset: 16, gso: true, mss: 1000}, nil},
		{"tso4 with ecn", b4, with(h4, func(h *tun.VnetHdr) { h.GSOType |= tun.VnetGSOECN }), offload{csum: true, csumStart: 20, csumOffset: 16, gso: true, mss: 1000}, nil},
		{"csum inside the ip header", b4, with(h4, func(h *tun.VnetHdr) { h.CsumStart = 10 }), offload{}, errOffloadCsum},
		{"csum past the end", udp, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 60000}, offload{}, errOffloadCsum},
		{"tso4 header on ipv6", b6, with(h6, func(h *tun.VnetHdr) { h.GSOType = tun.VnetGSOTCPv4 }), offload{}, errOffloadShape},
		{"tso on udp", udp, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, GSOType: tun.VnetGSOTCPv4, GSOSize: 100, CsumStart: 20, CsumOffset: 6}, offload{}, errOffloadShape},
		{"udp gso kind", udp, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, GSOType: tun.VnetGSOUDPL4, GSOSize: 100, CsumStart: 20, CsumOffset: 6}, offload{}, errOffloadKind},
		{"unknown gso kind", b4, with(h4, func(h *tun.VnetHdr) { h.GSOType = 9 }), offload{}, errOffloadKind},
		{"tso without partial csum", b4, with(h4, func(h *tun.VnetHdr) { h.Flags = 0 }), offload{}, errOffloadShape},
		{"tso csum not tcp's", b4, with(h4, func(h *tun.VnetHdr) { h.CsumOffset = 6 }), offload{}, errOffloadShape},
		{"tso zero segment size", b4, with(h4, func(h *tun.VnetHdr) { h.GSOSize = 0 }), offload{}, errOffloadShape},
		{"tso segment size below linux's minimum", b4, with(h4, func(h *tun.VnetHdr) { h.GSOSize = 47 }), offload{}, errOffloadShape},
		{"tso segment size at linux's minimum", b4, with(h4, func(h *tun.VnetHdr) { h.GSOSize = 48 }), offload{csum: true, csumStart: 20, csumOffset: 16, gso: true, mss: 48}, nil},
		{"tso syn", synB, synH, offload{}, errOffloadShape},
		{"tso rst", rstB, rstH, offload{}, errOffloadShape},
		{"tso tcp header too short", shortDoff(b4), h4, offload{}, errOffloadShape},
		{"tso tcp header past the end", b4[:39], h4, offload{}, errOffloadShape},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info := infoOf(t, tc.b)
			got, err := checkOffload(vnetToGSO(tc.h), &info, len(tc.b))
			if !errors.Is(err, tc.wantErr) || got != tc.want {
				t.Fatalf("checkOffload = %+v, %v; want %+v, %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestFinishChecksum(t *testing.T) {
	for _, tp := range []testPacket{
		{src: pod4, dst: dst4, flags: tcpFlagACK, payload: []byte("odd length")},
		{src: pod6, dst: dst6, flags: tcpFlagSYN, opts: mssOpt(65480)},
	} {
		want := tp.bytes()
		b := partial(tp.bytes(), 16)
		info := infoOf(t, b)
		finishChecksum(b, info.ipHdrLen, 16)
		if !bytes.Equal(b, want) {
			t.Errorf("finished\n%x\nwant\n%x", b, want)
		}
	}
}

// segments cuts b and returns copies of the segments.
func segments(t testing.TB, b []byte, mss int) [][]byte {
	t.Helper()
	info := infoOf(t, b)
	var segs [][]byte
	n, err := segmentTCP(b, &info, mss, nil, func(seg []byte) error {
		segs = append(segs, append([]byte(nil), seg...))
		return nil
	})
	if err != nil || n != len(segs) {
		t.Fatalf("segmentTCP = %d, %v (%d emitted)", n, err, len(segs))
	}
	return segs
}

// TestSegmentTCP checks that a super-packet is cut exactly as the pod's kernel
// would have sent it without TSO: each segment equals an independently built
// packet (lengths, sequence numbers, IPv4 IDs, flags, checksums).
func TestSegmentTCP(t *testing.T) {
	opts := []byte{tcpOptNOP, tcpOptNOP, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}
	payload := make([]byte, 2500)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	for _, tc := range []struct {
		name      string
		src, dst  netip.AddrPort
		wantSizes []int
	}{
		{"ipv4", pod4, dst4, []int{1000, 1000, 500}},
		{"ipv6", pod6, dst6, []int{1000, 1000, 500}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			super := testPacket{
				src: tc.src, dst: tc.dst, seq: 0xfffffc00, ack: 77, id: 0xfffe, opts: opts, payload: payload,
				flags: tcpFlagACK | tcpFlagPSH | tcpFlagFIN | tcpFlagCWR,
			}
			b, _ := superPacket(super)
			segs := segments(t, b, 1000)
			if len(segs) != len(tc.wantSizes) {
				t.Fatalf("%d segments, want %d", len(segs), len(tc.wantSizes))
			}
			off := 0
			for i, seg := range segs {
				want := super
				want.payload = payload[off : off+tc.wantSizes[i]]
				want.seq = super.seq + uint32(off) // wraps, as TCP does
				want.id = super.id + uint16(i)     // wraps too
				want.flags = tcpFlagACK
				if i == 0 {
					want.flags |= tcpFlagCWR
				}
				if i == len(segs)-1 {
					want.flags |= tcpFlagPSH | tcpFlagFIN
				}
				if tc.name == "ipv6" {
					want.id = 0
				}
				if !bytes.Equal(seg, want.bytes()) {
					t.Errorf("segment %d\n%x\nwant\n%x", i, seg, want.bytes())
				}
				off += tc.wantSizes[i]
			}
		})
	}
	t.Run("no payload", func(t *testing.T) {
		ack := testPacket{src: pod4, dst: dst4, flags: tcpFlagACK, seq: 5}
		b, _ := superPacket(ack)
		segs := segments(t, b, 1000)
		if len(segs) != 1 || !bytes.Equal(segs[0], ack.bytes()) {
			t.Fatalf("segments %x, want the packet with its checksum", segs)
		}
	})
}

// FuzzSegmentTCP feeds arbitrary offload headers and packets through the
// checks a packet from a pod meets; whatever checkOffload accepts must cut
// into valid segments (valid IP and TCP checksums, no segment over mss, the
// payload preserved) without panicking.
func FuzzSegmentTCP(f *testing.F) {
	b, h := superPacket(testPacket{src: pod4, dst: dst4, flags: tcpFlagACK, payload: bytes.Repeat([]byte("y"), 3000)})
	hb := make([]byte, tun.VnetHdrLen)
	h.Encode(hb)
	f.Add(append(hb, b...))
	b, h = superPacket(testPacket{src: pod6, dst: dst6, flags: tcpFlagACK | tcpFlagFIN, payload: []byte("short")})
	h.Encode(hb)
	f.Add(append(hb, b...))
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := tun.DecodeVnetHdr(in)
		if err != nil {
			return
		}
		b := in[tun.VnetHdrLen:]
		if len(b) > 0xffff {
			return // a TUN read is at most 64 KiB
		}
		info, err := parseIP(b[:min(len(b), maxHeaderPullUp)])
		if err != nil {
			return
		}
		off, err := checkOffload(vnetToGSO(h), &info, len(b))
		if err != nil || !off.gso {
			return
		}
		var total int
		_, err = segmentTCP(b, &info, off.mss, nil, func(seg []byte) error {
			si, err := parseIP(seg)
			if err != nil || !si.tcp || si.sport != info.sport || si.dport != info.dport || si.src != info.src || si.dst != info.dst {
				t.Fatalf("segment %x parses as %+v, %v", seg, si, err)
			}
			if si.version == 4 && csum(seg[:si.ipHdrLen]) != 0 {
				t.Fatal("bad IPv4 header checksum")
			}
			if !tcpChecksumOK(seg, si.ipHdrLen) {
				t.Fatal("bad TCP checksum")
			}
			if si.flags&(tcpFlagSYN|tcpFlagRST) != 0 {
				t.Fatal("SYN or RST in a segment")
			}
			pl := len(seg) - si.ipHdrLen - tcpDataOffset(seg, si.ipHdrLen)
			if pl > off.mss {
				t.Fatalf("segment payload %d over mss %d", pl, off.mss)
			}
			total += pl
			return nil
		})
		if err == nil && total != len(b)-info.ipHdrLen-tcpDataOffset(b, info.ipHdrLen) {
			t.Fatalf("segments carry %d payload bytes of %d", total, len(b))
		}
	})
}

func TestGSOToVnet(t *testing.T) {
	mk := func(g stack.GSO, payload int) *stack.PacketBuffer {
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
			ReserveHeaderBytes: 80,
			Payload:            buffer.MakeWithData(make([]byte, payload)),
		})
		pkt.TransportHeader().Push(32)
		pkt.NetworkHeader().Push(int(g.L3HdrLen))
		pkt.GSOOptions = g
		t.Cleanup(pkt.DecRef)
		return pkt
	}
	tcp4 := stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1448, L3HdrLen: 20, MaxSize: gsoMaxSize}
	tcp6 := tcp4
	tcp6.Type, tcp6.L3HdrLen = stack.GSOTCPv6, 40
	for _, tc := range []struct {
		name    string
		g       stack.GSO
		payload int
		want    tun.VnetHdr
	}{
		{"no gso (forwarder's SYN-ACK, RST)", stack.GSO{L3HdrLen: 20}, 0, tun.VnetHdr{}},
		{"one segment: partial checksum only", tcp4, 1448, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 16}},
		{"ack: partial checksum only", tcp6, 0, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 40, CsumOffset: 16}},
		{"super-packet v4", tcp4, 20000, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, GSOType: tun.VnetGSOTCPv4, HdrLen: 52, GSOSize: 1448, CsumStart: 20, CsumOffset: 16}},
		{"super-packet v6", tcp6, 1449, tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, GSOType: tun.VnetGSOTCPv6, HdrLen: 72, GSOSize: 1448, CsumStart: 40, CsumOffset: 16}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := gsoToVnet(mk(tc.g, tc.payload)); got != tc.want {
				t.Fatalf("gsoToVnet = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestVnetHdrRoundTrip(t *testing.T) {
	h := tun.VnetHdr{Flags: 1, GSOType: 4, HdrLen: 0x1234, GSOSize: 0xabcd, CsumStart: 40, CsumOffset: 16}
	b := make([]byte, tun.VnetHdrLen)
	h.Encode(b)
	if want := []byte{1, 4, 0x34, 0x12, 0xcd, 0xab, 40, 0, 16, 0}; !bytes.Equal(b, want) {
		t.Fatalf("encoded %x, want %x (little-endian)", b, want)
	}
	got, err := tun.DecodeVnetHdr(b)
	if err != nil || got != h {
		t.Fatalf("decoded %+v, %v; want %+v", got, err, h)
	}
	if _, err := tun.DecodeVnetHdr(b[:9]); !errors.Is(err, tun.ErrVnetHdr) {
		t.Fatalf("short header: err %v, want ErrVnetHdr", err)
	}
}

// TestFinishChecksumZeroIsMangled: a completed checksum of zero is written as
// 0xffff, as the kernel does: for UDP zero would mean "no checksum".
func TestFinishChecksumZeroIsMangled(t *testing.T) {
	payload := []byte("abcdefgh\x00\x00")
	udp := testPacket{src: pod4, dst: dst4, proto: 17, payload: payload}
	c0 := binary.BigEndian.Uint16(udp.bytes()[26:])
	// Adding the checksum itself as a payload word makes the sum 0xffff.
	binary.BigEndian.PutUint16(payload[8:], c0)
	b := partial(udp.bytes(), 6)
	finishChecksum(b, 20, 6)
	if got := binary.BigEndian.Uint16(b[26:]); got != 0xffff {
		t.Fatalf("checksum %#04x, want 0xffff", got)
	}
	if csum(pseudoHeader(b, 20, 17, len(b)-20), b[20:]) != 0 {
		t.Fatal("mangled checksum does not verify")
	}
}

// shortDoff is a copy of the IPv4 packet b with a TCP data offset of 16 bytes.
func shortDoff(b []byte) []byte {
	b = append([]byte(nil), b...)
	b[20+12] = 4 << 4
	return b
}
