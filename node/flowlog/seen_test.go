package flowlog

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestSeenEvictsLeastRecentlyUpdated: when the table is full, the kind
// updated longest ago goes, not one repeated just now; kinds older than
// Keep go first.
func TestSeenEvictsLeastRecentlyUpdated(t *testing.T) {
	l := New(nil, nil, Options{Keep: time.Minute, MaxRecent: 3})
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	seen := func(port uint16) {
		now = now.Add(time.Second)
		l.Seen(Conn{Proxy: Out, Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), port), TLS: "not_meshed"})
	}
	has := func() map[uint16]int {
		out := map[uint16]int{}
		for _, c := range l.Conns() {
			out[c.Dst.Port()] = max(1, c.Count)
		}
		return out
	}
	seen(1)
	seen(2)
	seen(3)
	seen(1) // 1 is now the newest
	seen(4) // evicts 2
	if got := has(); len(got) != 3 || got[1] != 2 || got[2] != 0 || got[3] != 1 || got[4] != 1 {
		t.Fatalf("kept %v, want 1 (twice), 3, 4", got)
	}
	now = now.Add(2 * time.Minute)
	seen(5) // the others are past Keep
	if got := has(); len(got) != 1 || got[5] != 1 || len(l.seen) != 1 || l.seenOrder.Len() != 1 {
		t.Fatalf("kept %v (table %d), want 5 only", got, len(l.seen))
	}
}

// BenchmarkSeenFull: a new kind of unmeshed connection while the table is
// full of young kinds (review: 146 µs per new key when the full table was
// scanned under the Log's lock).
func BenchmarkSeenFull(b *testing.B) {
	l := New(nil, nil, Options{})
	src := netip.MustParseAddr("10.0.0.1")
	key := func(i int) Conn {
		return Conn{Proxy: Out, Src: netip.AddrPortFrom(src, 40000), Dst: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), uint16(i)), TLS: "not_meshed"}
	}
	for i := 0; i < 4096; i++ {
		l.Seen(key(i))
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Seen(key(4096 + i))
	}
}

// TestTunnelOf: a TCP connection's 4-tuple, local end first.
func TestTunnelOf(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ct, st := TunnelOf(c), TunnelOf(s)
	if ct[0] != st[1] || ct[1] != st[0] || ct[1].String() != ln.Addr().String() || !ct[0].Addr().Is4() {
		t.Fatalf("client %v, server %v", ct, st)
	}
	if p := TunnelOf(pipeAddrs{}); p[0].IsValid() || p[1].IsValid() {
		t.Fatalf("non-IP addresses: %v", p)
	}
}

type pipeAddrs struct{}

func (pipeAddrs) LocalAddr() net.Addr  { return pipeAddr{} }
func (pipeAddrs) RemoteAddr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }
