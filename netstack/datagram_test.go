package netstack

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

func TestDatagramKeyOf(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("10.201.1.2:40000"), netip.MustParseAddrPort("10.201.0.9:53")
	src6, dst6 := netip.MustParseAddrPort("[fd00:201::2]:40000"), netip.MustParseAddrPort("[fd00:201::9]:53")
	frag := testPacket{src: src4, dst: dst4, proto: protoUDP, payload: []byte("x")}.bytes()
	frag[6], frag[7] = 0x20, 0 // MF: a first fragment, ports not trusted
	for _, tc := range []struct {
		name     string
		pkt      []byte
		proto    uint8
		src, dst netip.AddrPort
	}{
		{"udp v4", testPacket{src: src4, dst: dst4, proto: protoUDP}.bytes(), protoUDP, src4, dst4},
		{"udp v6", testPacket{src: src6, dst: dst6, proto: protoUDP}.bytes(), protoUDP, src6, dst6},
		{"sctp ports", testPacket{src: src4, dst: dst4, proto: protoSCTP, payload: []byte{0x9c, 0x40, 0, 53, 0, 0, 0, 0}}.bytes(),
			protoSCTP, src4, dst4},
		{"icmp: no ports", testPacket{src: src4, dst: dst4, proto: 1, payload: []byte{8, 0, 0, 0, 0, 1, 0, 1}}.bytes(),
			1, netip.AddrPortFrom(src4.Addr(), 0), netip.AddrPortFrom(dst4.Addr(), 0)},
		{"fragment: no ports", frag, protoUDP, netip.AddrPortFrom(src4.Addr(), 0), netip.AddrPortFrom(dst4.Addr(), 0)},
		{"udp header cut short", testPacket{src: src4, dst: dst4, proto: protoUDP}.bytes()[:22], protoUDP,
			netip.AddrPortFrom(src4.Addr(), 0), netip.AddrPortFrom(dst4.Addr(), 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info, err := parseIP(tc.pkt)
			if err != nil {
				t.Fatal(err)
			}
			k := datagramKeyOf(tc.pkt, &info)
			want := datagramKey{proto: tc.proto, src: tc.src, dst: tc.dst}
			if k != want {
				t.Fatalf("key = %+v, want %+v", k, want)
			}
		})
	}
}

// TestDatagramTableBound: the table never holds more than its cap; a full
// table makes room from expired entries only; allowed entries live while
// used, denied ones a fixed time.
func TestDatagramTableBound(t *testing.T) {
	var tb datagramTable
	key := func(i int) datagramKey {
		return datagramKey{proto: protoUDP, src: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i)),
			dst: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), uint16(i>>16)+1)}
	}
	sec := int64(time.Second)
	for i := range maxDatagramFlows {
		if !tb.remember(key(i), true, 0) {
			t.Fatalf("entry %d not remembered below the cap", i)
		}
	}
	// Keep entry 0 alive; the others go idle.
	if ok, known := tb.lookup(key(0), 20*sec); !ok || !known {
		t.Fatal("allowed entry not found")
	}
	if tb.remember(key(maxDatagramFlows), true, 29*sec) {
		t.Fatal("remembered past the cap with no expired entry")
	}
	if n := tb.size(); n != maxDatagramFlows {
		t.Fatalf("size = %d, want %d", n, maxDatagramFlows)
	}
	if !tb.remember(key(maxDatagramFlows), false, 31*sec) {
		t.Fatal("full table did not make room from expired entries")
	}
	if n := tb.size(); n != 2 {
		t.Fatalf("size after sweep = %d, want 2 (the used entry and the new one)", n)
	}
	if _, known := tb.lookup(key(0), 31*sec); !known {
		t.Fatal("entry used at 20s expired at 31s")
	}
	// A denied entry lives datagramDenyTTL from its decision, used or not.
	if ok, known := tb.lookup(key(maxDatagramFlows), 32*sec); ok || !known {
		t.Fatalf("denied entry: allowed %v known %v, want denied and known", ok, known)
	}
	if _, known := tb.lookup(key(maxDatagramFlows), 31*sec+int64(datagramDenyTTL)); known {
		t.Fatal("denied entry outlived datagramDenyTTL")
	}
}

// dgramHandler is a testHandler that also judges non-TCP flows.
type dgramHandler struct {
	testHandler
	allow func(Datagram) bool

	mu    sync.Mutex
	asked []Datagram
}

func (h *dgramHandler) HandleDatagram(d Datagram) bool {
	h.mu.Lock()
	h.asked = append(h.asked, d)
	h.mu.Unlock()
	return h.allow(d)
}

// TestDatagramsDecided: the first packet of a non-TCP flow is judged by
// the DatagramDecider; a denied flow's packets never reach the host and
// are counted; an allowed flow's later packets pass on the remembered
// decision (one decision per flow).
func TestDatagramsDecided(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	h := &dgramHandler{allow: func(d Datagram) bool { return d.Proto == protoUDP && d.Dst.Port() == 53 }}
	s := newStack(t, Options{Handler: h, Passthrough: rec})
	p := newPod(t, s, 14, 1500)

	dns := testPacket{src: netip.AddrPortFrom(p.addr4, 40200), dst: netip.MustParseAddrPort("10.201.0.9:53"), proto: protoUDP,
		payload: []byte("query")}
	other := dns
	other.dst = netip.MustParseAddrPort("10.201.0.9:5353")
	other.payload = []byte("never in the host")
	ping := testPacket{src: netip.AddrPortFrom(p.addr4, 0), dst: netip.MustParseAddrPort("10.201.0.9:0"), proto: 1,
		payload: []byte{8, 0, 0, 0, 0, 1, 0, 1}}
	for range 3 {
		p.ns.Inject(t, "tm0", dns.bytes())
		p.ns.Inject(t, "tm0", other.bytes())
		p.ns.Inject(t, "tm0", ping.bytes())
	}
	nstest.WaitFor(t, 5*time.Second, func() error {
		st, _ := s.NICStats(p.nic)
		var n int
		for _, pkt := range rec.all() {
			if k := keyOfPacket(t, pkt); k.dst == dns.dst {
				n++
			}
		}
		if n != 3 || st.DatagramDenied != 6 {
			return fmt.Errorf("%d allowed packets passed (want 3), %d denied (want 6)", n, st.DatagramDenied)
		}
		return nil
	})
	for _, pkt := range rec.all() {
		if k := keyOfPacket(t, pkt); k.dst != dns.dst {
			t.Fatalf("a packet of a denied flow reached the host: %+v", k)
		}
	}
	st, _ := s.NICStats(p.nic)
	if st.DatagramDecisions != 3 || st.DatagramFlows != 3 {
		t.Errorf("decisions %d, remembered flows %d; want 3 and 3 (one per flow)", st.DatagramDecisions, st.DatagramFlows)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.asked) != 3 {
		t.Fatalf("decider asked %d times (%v), want 3", len(h.asked), h.asked)
	}
	if h.asked[0].NIC != p.nic || h.asked[0].Src != dns.src || h.asked[0].Dst != dns.dst {
		t.Errorf("first datagram = %+v, want nic %d %s -> %s", h.asked[0], p.nic, dns.src, dns.dst)
	}
}

func keyOfPacket(t *testing.T, pkt []byte) datagramKey {
	t.Helper()
	info, err := parseIP(pkt)
	if err != nil {
		t.Fatal(err)
	}
	return datagramKeyOf(pkt, &info)
}

// BenchmarkDatagramKnownFlow is the per-packet cost the judgement adds to
// a non-TCP packet of a flow already decided (the common case): parsing
// its ports and one lookup in the NIC's table.
func BenchmarkDatagramKnownFlow(b *testing.B) {
	h := &dgramHandler{allow: func(Datagram) bool { return true }}
	n := &nic{s: &Stack{opts: Options{Handler: h}, epoch: time.Now()}}
	pkt := testPacket{src: netip.MustParseAddrPort("10.201.1.2:40000"), dst: netip.MustParseAddrPort("10.201.0.9:53"),
		proto: protoUDP, payload: make([]byte, 64)}.bytes()
	info, err := parseIP(pkt)
	if err != nil {
		b.Fatal(err)
	}
	for i := range 1000 { // a table with other flows in it
		n.datagrams.remember(datagramKey{proto: protoUDP, src: netip.AddrPortFrom(info.src, uint16(i)), dst: netip.AddrPortFrom(info.dst, 53)}, true, 0)
	}
	b.ReportAllocs()
	for b.Loop() {
		if !n.datagramAllowed(pkt, &info) {
			b.Fatal("denied")
		}
	}
	if len(h.asked) != 1 {
		b.Fatalf("decider asked %d times, want 1", len(h.asked))
	}
}

// FuzzDatagramKeyOf: any header the classifier accepts gives a key
// without panicking, with ports only for the protocols that have them
// and never for a fragment.
func FuzzDatagramKeyOf(f *testing.F) {
	f.Add(testPacket{src: netip.MustParseAddrPort("10.201.1.2:40000"), dst: netip.MustParseAddrPort("10.201.0.9:53"), proto: protoUDP}.bytes())
	f.Add(testPacket{src: netip.MustParseAddrPort("[fd00::1]:1"), dst: netip.MustParseAddrPort("[fd00::2]:2"), proto: protoSCTP, payload: make([]byte, 8)}.bytes())
	f.Add([]byte{0x45, 0, 0, 20})
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := parseIP(b)
		if err != nil {
			return
		}
		k := datagramKeyOf(b, &info)
		if k.proto != info.proto || k.src.Addr() != info.src || k.dst.Addr() != info.dst {
			t.Fatalf("key %+v does not match the header %+v", k, info)
		}
		hasPorts := info.proto == protoUDP || info.proto == protoUDPLite || info.proto == protoSCTP || info.proto == protoDCCP
		if (!hasPorts || info.fragment) && (k.src.Port() != 0 || k.dst.Port() != 0) {
			t.Fatalf("ports in the key of proto %d fragment %v: %+v", info.proto, info.fragment, k)
		}
	})
}
