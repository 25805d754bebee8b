package service

import (
	"net/netip"
	"testing"
	"time"
)

// TestClientLimiter (item 8): one client over its rate is refused while
// another is not; a flood of distinct addresses cannot grow the table
// past its bound.
func TestClientLimiter(t *testing.T) {
	l := newClientLimiter(1, 3, 2)
	now := time.Unix(1000, 0)
	a, b, c := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	for i := range 3 {
		if !l.allow(a, now) {
			t.Fatalf("request %d within the burst refused", i)
		}
	}
	if l.allow(a, now) {
		t.Fatal("request past the burst allowed")
	}
	if !l.allow(b, now) {
		t.Fatal("another client refused")
	}
	if l.allow(c, now) {
		t.Fatal("a third address remembered past the bound")
	}
	if !l.allow(c, now.Add(2*time.Minute)) {
		t.Fatal("idle clients not forgotten")
	}
	if !l.allow(a, now.Add(2*time.Second)) {
		t.Fatal("rate not refilled")
	}
}
