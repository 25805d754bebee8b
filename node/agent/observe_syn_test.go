package agent

import (
	"net/netip"
	"testing"
	"time"
)

func synKey(i int) [2]netip.AddrPort {
	return [2]netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), uint16(30000+i%1000)), netip.MustParseAddrPort("10.1.0.5:8080")}
}

// TestRecentSYNs: a key is first once within synMemory and again after;
// the two generations never hold more than 2*synGeneration keys.
func TestRecentSYNs(t *testing.T) {
	var r recentSYNs
	t0 := time.Unix(1000, 0)
	k := synKey(1)
	if !r.first(k, t0) || r.first(k, t0.Add(time.Second)) || r.first(k, t0.Add(synMemory-time.Millisecond)) {
		t.Fatal("a key seen again within synMemory counted twice")
	}
	// Rotated into the older generation: still remembered.
	late := synKey(3)
	if !r.first(late, t0.Add(2500*time.Millisecond)) || !r.first(synKey(2), t0.Add(synMemory)) {
		t.Fatal("new keys not first")
	}
	if _, ok := r.prev[late]; !ok {
		t.Fatal("no rotation at synMemory")
	}
	if r.first(late, t0.Add(3500*time.Millisecond)) {
		t.Fatal("a key in the older generation counted twice within synMemory")
	}
	if !r.first(k, t0.Add(synMemory+time.Second)) {
		t.Fatal("a key after synMemory not counted again")
	}
	if r.first(k, t0.Add(synMemory+2*time.Second)) {
		t.Fatal("the re-counted key not remembered")
	}
	for i := 0; i < 5*synGeneration; i++ {
		r.first(synKey(i+10), t0.Add(10*time.Second))
	}
	if n := len(r.cur) + len(r.prev); n > 2*synGeneration {
		t.Fatalf("%d keys held, want at most %d", n, 2*synGeneration)
	}
}

// BenchmarkRecentSYNs: new keys arriving faster than synMemory expires
// them (review: 108 µs per SYN with 20k keys when a full map was scanned).
func BenchmarkRecentSYNs(b *testing.B) {
	var r recentSYNs
	keys := make([][2]netip.AddrPort, 20000)
	for i := range keys {
		keys[i] = synKey(i)
	}
	now := time.Now()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r.first(keys[i%len(keys)], now)
	}
}
