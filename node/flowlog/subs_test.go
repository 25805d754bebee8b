package flowlog

import (
	"fmt"
	"net/netip"
	"testing"
)

// TestSubscribersIndexed: what each subscriber receives through the index
// is exactly what Filter.match selects, across namespaces, names, unknown
// ends and same-namespace pairs (each event at most once).
func TestSubscribersIndexed(t *testing.T) {
	pods := []PodRef{{}, {Namespace: "shop", Name: "web-1"}, {Namespace: "shop", Name: "db-1"}, {Namespace: "bank", Name: "web-1"}, {Namespace: "bank", Name: "api-1"}}
	filters := []Filter{{}, {Namespace: "shop"}, {Namespace: "bank"}, {Namespace: "shop", Name: "web-1"}, {Namespace: "bank", Name: "web-1"}, {Name: "web-1"}, {Namespace: "other"}}
	l := New(nil, nil, Options{})
	subs := make([]*Sub, len(filters))
	for i, f := range filters {
		subs[i] = l.Subscribe(f, 1000)
		defer subs[i].Close()
	}
	want := make([]int, len(filters))
	for _, src := range pods {
		for _, dst := range pods {
			c := Conn{Proxy: Out, Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.2:2"), SrcPod: src, DstPod: dst, TLS: TLSTrue}
			for i, f := range filters {
				if f.match(&c) {
					want[i] += 2 // open and close
				}
			}
			l.Open(c).Close(0, 0, "clean")
		}
	}
	for i, s := range subs {
		if got := len(s.C()); got != want[i] || s.Dropped() != 0 {
			t.Errorf("filter %+v: %d events (dropped %d), want %d", filters[i], got, s.Dropped(), want[i])
		}
	}
	// Either end: shop/web-1 is the source of 5 pairs and the destination
	// of 5, one pair both: 9 connections, open and close each.
	if want[3] != 18 || want[6] != 0 {
		t.Fatalf("Filter.match: %v; want 18 events for shop/web-1 (either end) and none for another namespace", want)
	}
}

// BenchmarkPublishManySubscribers: a connection's open and close while
// many taps of other namespaces are open (review: 152 µs per open+close
// with 5000 subscribers when publish walked them all under the Log's
// lock).
func BenchmarkPublishManySubscribers(b *testing.B) {
	for _, n := range []int{0, 5000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			l := New(nil, nil, Options{})
			for i := 0; i < n; i++ {
				defer l.Subscribe(Filter{Namespace: fmt.Sprintf("ns-%d", i), Name: "p"}, 1).Close()
			}
			tapper := l.Subscribe(Filter{Namespace: "shop"}, 1)
			defer tapper.Close()
			c := Conn{Proxy: Out, Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.2:2"),
				SrcPod: PodRef{Namespace: "shop", Name: "web-1"}, DstPod: PodRef{Namespace: "bank", Name: "api-1"}, TLS: TLSTrue}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				l.Open(c).Close(0, 0, "clean")
			}
		})
	}
}
