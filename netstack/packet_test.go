package netstack

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

// csum is a reference Internet checksum (RFC 1071) over the concatenation
// of parts, each of which must have even length except the last.
func csum(parts ...[]byte) uint16 {
	var sum uint32
	for _, p := range parts {
		for i := 0; i+1 < len(p); i += 2 {
			sum += uint32(p[i])<<8 | uint32(p[i+1])
		}
		if len(p)%2 == 1 {
			sum += uint32(p[len(p)-1]) << 8
		}
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// pseudoHeader returns the TCP/UDP pseudo-header of an IP packet.
func pseudoHeader(pkt []byte, ipHdrLen int, proto byte, l4len int) []byte {
	if pkt[0]>>4 == 4 {
		ph := make([]byte, 12)
		copy(ph[0:8], pkt[12:20])
		ph[9] = proto
		binary.BigEndian.PutUint16(ph[10:], uint16(l4len))
		return ph
	}
	ph := make([]byte, 40)
	copy(ph[0:32], pkt[8:40])
	binary.BigEndian.PutUint32(ph[32:], uint32(l4len))
	ph[39] = proto
	return ph
}

// tcpChecksumOK verifies the TCP checksum of a whole IP packet.
func tcpChecksumOK(pkt []byte, ipHdrLen int) bool {
	seg := pkt[ipHdrLen:]
	return csum(pseudoHeader(pkt, ipHdrLen, protoTCP, len(seg)), seg) == 0
}

// testPacket builds an IPv4 or IPv6 packet (by src's family) carrying a TCP
// segment (proto 6) or an opaque payload for other protocols, with correct
// checksums.
type testPacket struct {
	src, dst netip.AddrPort
	proto    byte // default TCP
	flags    byte
	seq, ack uint32
	opts     []byte // TCP options, padded to 4 bytes by the caller
	payload  []byte
	ttl      byte
	id       uint16
}

func (p testPacket) bytes() []byte {
	proto := p.proto
	if proto == 0 {
		proto = protoTCP
	}
	var l4 []byte
	switch proto {
	case protoTCP:
		l4 = make([]byte, 20+len(p.opts)+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], p.seq)
		binary.BigEndian.PutUint32(l4[8:], p.ack)
		l4[12] = byte((20+len(p.opts))/4) << 4
		l4[13] = p.flags
		binary.BigEndian.PutUint16(l4[14:], 64240)
		copy(l4[20:], p.opts)
		copy(l4[20+len(p.opts):], p.payload)
	case 17: // UDP
		l4 = make([]byte, 8+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], p.payload)
	default:
		l4 = append([]byte(nil), p.payload...)
	}
	ttl := p.ttl
	if ttl == 0 {
		ttl = 64
	}
	var pkt []byte
	var hl int
	if p.src.Addr().Is4() {
		hl = 20
		pkt = make([]byte, hl+len(l4))
		pkt[0] = 0x45
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		binary.BigEndian.PutUint16(pkt[4:], p.id)
		pkt[6] = 0x40 // DF
		pkt[8] = ttl
		pkt[9] = proto
		s, d := p.src.Addr().As4(), p.dst.Addr().As4()
		copy(pkt[12:], s[:])
		copy(pkt[16:], d[:])
		binary.BigEndian.PutUint16(pkt[10:], csum(pkt[:20]))
	} else {
		hl = 40
		pkt = make([]byte, hl+len(l4))
		pkt[0] = 0x60
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(l4)))
		pkt[6] = proto
		pkt[7] = ttl
		s, d := p.src.Addr().As16(), p.dst.Addr().As16()
		copy(pkt[8:], s[:])
		copy(pkt[24:], d[:])
	}
	copy(pkt[hl:], l4)
	switch proto {
	case protoTCP:
		binary.BigEndian.PutUint16(pkt[hl+16:], csum(pseudoHeader(pkt, hl, proto, len(l4)), pkt[hl:]))
	case 17:
		binary.BigEndian.PutUint16(pkt[hl+6:], csum(pseudoHeader(pkt, hl, proto, len(l4)), pkt[hl:]))
	}
	return pkt
}

func mssOpt(v uint16) []byte { return []byte{tcpOptMSS, 4, byte(v >> 8), byte(v)} }

var (
	pod4  = netip.MustParseAddrPort("10.200.0.2:40000")
	dst4  = netip.MustParseAddrPort("10.201.0.9:8081")
	pod6  = netip.MustParseAddrPort("[fd00:200::2]:40000")
	dst6  = netip.MustParseAddrPort("[fd00:201::9]:8081")
	synV4 = testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, seq: 1000, opts: mssOpt(9000)}
)

func TestParseIP(t *testing.T) {
	frag := synV4.bytes()
	frag[6] = 0x20 // MF

	for _, tc := range []struct {
		name    string
		pkt     []byte
		wantErr bool
		want    packetInfo
	}{
		{name: "empty", pkt: nil, wantErr: true},
		{name: "short v4", pkt: synV4.bytes()[:19], wantErr: true},
		{name: "bad version", pkt: append([]byte{0x55}, make([]byte, 40)...), wantErr: true},
		{name: "v4 ihl too small", pkt: append([]byte{0x44}, make([]byte, 40)...), wantErr: true},
		{
			name: "v4 syn",
			pkt:  synV4.bytes(),
			want: packetInfo{version: 4, proto: protoTCP, ipHdrLen: 20, src: pod4.Addr(), dst: dst4.Addr(),
				tcp: true, sport: pod4.Port(), dport: dst4.Port(), flags: tcpFlagSYN, tcpHdrLen: 24},
		},
		{
			name: "v6 syn-ack",
			pkt:  testPacket{src: pod6, dst: dst6, flags: tcpFlagSYN | tcpFlagACK}.bytes(),
			want: packetInfo{version: 6, proto: protoTCP, ipHdrLen: 40, src: pod6.Addr(), dst: dst6.Addr(),
				tcp: true, sport: pod6.Port(), dport: dst6.Port(), flags: tcpFlagSYN | tcpFlagACK, tcpHdrLen: 20},
		},
		{
			name: "v4 udp",
			pkt:  testPacket{src: pod4, dst: dst4, proto: 17, payload: []byte("hi")}.bytes(),
			want: packetInfo{version: 4, proto: 17, ipHdrLen: 20, src: pod4.Addr(), dst: dst4.Addr()},
		},
		{
			name: "v4 fragment",
			pkt:  frag,
			want: packetInfo{version: 4, proto: protoTCP, ipHdrLen: 20, src: pod4.Addr(), dst: dst4.Addr(), fragment: true},
		},
		{
			name: "v4 tcp truncated before flags",
			pkt:  synV4.bytes()[:20+13],
			want: packetInfo{version: 4, proto: protoTCP, ipHdrLen: 20, src: pod4.Addr(), dst: dst4.Addr()},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseIP(tc.pkt)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if err == nil && got != tc.want {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestPureSYN(t *testing.T) {
	for flags, want := range map[byte]bool{
		tcpFlagSYN:               true,
		tcpFlagSYN | tcpFlagACK:  false,
		tcpFlagSYN | tcpFlagRST:  false,
		tcpFlagACK:               false,
		tcpFlagSYN | 0x08 | 0x80: true, // PSH, CWR ignored
	} {
		p := packetInfo{tcp: true, flags: flags}
		if got := p.isPureSYN(); got != want {
			t.Errorf("flags %#x: isPureSYN = %v, want %v", flags, got, want)
		}
	}
}

func TestMSSLimit(t *testing.T) {
	for _, tc := range []struct {
		mtu     int
		version uint8
		want    uint16
	}{
		{0, 4, 0}, {40, 4, 0}, {1500, 4, 1460}, {1500, 6, 1440}, {1450, 4, 1410}, {70000, 4, 0xffff},
	} {
		if got := mssLimit(tc.mtu, tc.version); got != tc.want {
			t.Errorf("mssLimit(%d, %d) = %d, want %d", tc.mtu, tc.version, got, tc.want)
		}
	}
}

func TestClampMSS(t *testing.T) {
	wsSack := []byte{tcpOptNOP, 3, 3, 7, 4, 2, tcpOptNOP, tcpOptNOP} // wscale, sackOK
	for _, tc := range []struct {
		name    string
		pkt     testPacket
		limit   uint16
		want    bool
		wantMSS uint16
	}{
		{"v4 clamps", synV4, 1460, true, 1460},
		{"v4 below limit", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, opts: mssOpt(1200)}, 1460, false, 1200},
		{"v4 equal", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, opts: mssOpt(1460)}, 1460, false, 1460},
		{"off", synV4, 0, false, 9000},
		{"v6 clamps", testPacket{src: pod6, dst: dst6, flags: tcpFlagSYN, opts: mssOpt(65476)}, 1440, true, 1440},
		{"after other options", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN | tcpFlagACK,
			opts: append(append([]byte(nil), wsSack...), mssOpt(65000)...)}, 1460, true, 1460},
		// NOP shifts the MSS value to an odd offset: the incremental
		// checksum must use byte-swapped words.
		{"odd offset", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN,
			opts: []byte{tcpOptNOP, tcpOptMSS, 4, 0xff, 0xd7, tcpOptNOP, tcpOptNOP, tcpOptNOP}}, 1460, true, 1460},
		{"no mss", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, opts: wsSack}, 1460, false, 0},
		{"end of options first", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN,
			opts: append([]byte{tcpOptEnd, 0, 0, 0}, mssOpt(9000)...)}, 1460, false, 0},
		{"bad length", testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, opts: []byte{tcpOptMSS, 9, 0x23, 0x28}}, 1460, false, 0x2328},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := tc.pkt.bytes()
			orig := append([]byte(nil), pkt...)
			info, err := parseIP(pkt)
			if err != nil {
				t.Fatal(err)
			}
			if got := ClampMSS(pkt, info.ipHdrLen, tc.limit); got != tc.want {
				t.Fatalf("clampMSS = %v, want %v", got, tc.want)
			}
			if !tcpChecksumOK(pkt, info.ipHdrLen) {
				t.Error("TCP checksum invalid after clamp")
			}
			if !tc.want && !bytes.Equal(pkt, orig) {
				t.Error("packet changed although not clamped")
			}
			if tc.wantMSS != 0 {
				if got := findMSS(pkt[info.ipHdrLen:]); got != tc.wantMSS {
					t.Errorf("MSS = %d, want %d", got, tc.wantMSS)
				}
			}
			// Only the MSS value and the checksum may differ.
			var diff []int
			for i := range pkt {
				if pkt[i] != orig[i] {
					diff = append(diff, i-info.ipHdrLen)
				}
			}
			for _, off := range diff {
				if off != 16 && off != 17 && (off < 20 || off >= 20+len(tc.pkt.opts)) {
					t.Errorf("byte at TCP offset %d changed", off)
				}
			}
		})
	}
}

// findMSS returns the MSS option value of a TCP header, or 0.
func findMSS(t []byte) uint16 {
	doff := int(t[12]>>4) * 4
	for i := 20; i < doff; {
		switch t[i] {
		case tcpOptEnd:
			return 0
		case tcpOptNOP:
			i++
			continue
		}
		if i+1 >= doff || t[i+1] < 2 {
			return 0
		}
		if t[i] == tcpOptMSS && i+4 <= doff {
			return binary.BigEndian.Uint16(t[i+2:])
		}
		i += int(t[i+1])
	}
	return 0
}

func FuzzParseIP(f *testing.F) {
	f.Add(synV4.bytes())
	f.Add(testPacket{src: pod6, dst: dst6, flags: tcpFlagSYN}.bytes())
	f.Add(testPacket{src: pod4, dst: dst4, proto: 17, payload: []byte("x")}.bytes())
	f.Add([]byte{0x4f})
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseIP(b)
		if err != nil {
			return
		}
		if p.ipHdrLen > len(b) || (p.version != 4 && p.version != 6) {
			t.Fatalf("bad info %+v for %d bytes", p, len(b))
		}
		if p.tcp && (p.fragment || p.proto != protoTCP || len(b) < p.ipHdrLen+tcpFlagsOff+1) {
			t.Fatalf("tcp info without a TCP header: %+v", p)
		}
	})
}

// FuzzClampMSS checks that clamping never panics, never raises an MSS,
// touches only the MSS value and checksum, and keeps a valid checksum valid.
func FuzzClampMSS(f *testing.F) {
	f.Add([]byte{tcpOptNOP, tcpOptMSS, 4, 0xff, 0xd7, 0, 0, 0}, uint16(1460), false)
	f.Add(mssOpt(9000), uint16(1460), true)
	f.Add([]byte{3, 3, 7, tcpOptMSS, 4, 0x23, 0x28, 0}, uint16(536), false)
	f.Fuzz(func(t *testing.T, opts []byte, limit uint16, v6 bool) {
		if len(opts) > 40 {
			opts = opts[:40]
		}
		for len(opts)%4 != 0 {
			opts = append(opts, tcpOptEnd)
		}
		tp := testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, opts: opts}
		if v6 {
			tp.src, tp.dst = pod6, dst6
		}
		pkt := tp.bytes()
		orig := append([]byte(nil), pkt...)
		info, err := parseIP(pkt)
		if err != nil {
			t.Fatal(err)
		}
		before := findMSS(pkt[info.ipHdrLen:])
		changed := ClampMSS(pkt, info.ipHdrLen, limit)
		if !tcpChecksumOK(pkt, info.ipHdrLen) {
			t.Fatal("checksum broken")
		}
		after := findMSS(pkt[info.ipHdrLen:])
		if changed && (after != limit || before <= limit) {
			t.Fatalf("changed MSS %d -> %d with limit %d", before, after, limit)
		}
		if !changed && !bytes.Equal(pkt, orig) {
			t.Fatal("reported unchanged but bytes differ")
		}
		if !bytes.Equal(pkt[:info.ipHdrLen], orig[:info.ipHdrLen]) {
			t.Fatal("IP header changed")
		}
	})
}

func TestChecksumUpdateMatchesRecompute(t *testing.T) {
	data := []byte{0x12, 0x34, 0xab, 0xcd, 0xff, 0xff, 0x00, 0x01}
	hc := csum(data)
	for _, nw := range []uint16{0, 1, 0xffff, 0x5678} {
		old := binary.BigEndian.Uint16(data[2:])
		d := append([]byte(nil), data...)
		binary.BigEndian.PutUint16(d[2:], nw)
		got := checksumUpdate(hc, old, nw)
		// 0x0000 and 0xffff are both zero in one's complement.
		want := csum(d)
		if got != want && !(got == 0 && want == 0xffff) && !(got == 0xffff && want == 0) {
			t.Errorf("new %#x: incremental %#x, recomputed %#x", nw, got, want)
		}
	}
}
