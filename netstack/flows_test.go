package netstack

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

func TestFlowTableLifecycle(t *testing.T) {
	ft := newFlowTable()
	k := flowKey{src: pod4, dst: dst4}
	syn1, syn2 := []byte("syn1"), []byte("syn2")
	sec := int64(time.Second)

	if ft.syn(k, 0, func() []byte { return syn1 }) {
		t.Fatal("unknown flow reported as passthrough")
	}
	// A retransmission while undecided replaces the kept SYN.
	if ft.syn(k, 1*sec, func() []byte { return syn2 }) {
		t.Fatal("pending flow reported as passthrough")
	}
	if got, _ := ft.promote(k, 2*sec); !bytes.Equal(got, syn2) {
		t.Fatalf("promote returned %q, want the latest SYN", got)
	}
	if p, q := ft.sizes(); p != 1 || q != 0 {
		t.Fatalf("sizes = %d, %d; want 1, 0", p, q)
	}
	if !ft.syn(k, 3*sec, func() []byte { t.Fatal("copied SYN of a known flow"); return nil }) {
		t.Fatal("SYN retransmission of a passthrough flow not passed through")
	}

	// Traffic keeps the flow alive.
	ft.touch(k, 100*sec, false)
	ft.expire(101*sec, 10*sec, 30*sec)
	if p, _ := ft.sizes(); p != 1 {
		t.Fatal("active flow expired")
	}
	ft.expire(111*sec, 10*sec, 30*sec)
	if p, _ := ft.sizes(); p != 0 {
		t.Fatal("idle flow not expired")
	}
}

func TestFlowTableReuseAfterClose(t *testing.T) {
	ft := newFlowTable()
	k := flowKey{src: pod4, dst: dst4}
	ft.syn(k, 0, func() []byte { return nil })
	ft.promote(k, 0)
	ft.touch(k, 1, true) // FIN from the pod
	if ft.syn(k, 2, func() []byte { return []byte("new") }) {
		t.Fatal("SYN after FIN treated as a retransmission; want a new decision")
	}
	if p, q := ft.sizes(); p != 0 || q != 1 {
		t.Fatalf("sizes = %d, %d; want 0, 1", p, q)
	}
}

func TestFlowTablePendingExpiryAndCap(t *testing.T) {
	ft := newFlowTable()
	for i := range maxPendingSYNs + 10 {
		k := flowKey{src: netip.AddrPortFrom(pod4.Addr(), uint16(i)), dst: dst4}
		ft.syn(k, 0, func() []byte { return []byte{1} })
	}
	if _, q := ft.sizes(); q != maxPendingSYNs {
		t.Fatalf("pending = %d, want capped at %d", q, maxPendingSYNs)
	}
	ft.forget(flowKey{src: netip.AddrPortFrom(pod4.Addr(), 0), dst: dst4})
	if _, q := ft.sizes(); q != maxPendingSYNs-1 {
		t.Fatalf("forget did not remove a pending SYN")
	}
	ft.expire(int64(time.Minute), int64(time.Hour), int64(30*time.Second))
	if _, q := ft.sizes(); q != 0 {
		t.Fatalf("pending = %d after TTL, want 0", q)
	}
	// A decision whose SYN copy was not kept still records the flow.
	k := flowKey{src: pod4, dst: dst4}
	if got, _ := ft.promote(k, 0); got != nil {
		t.Fatalf("promote without a kept SYN returned %q", got)
	}
}

func TestRateLimit(t *testing.T) {
	var r rateLimit
	sec := int64(time.Second)
	if !r.allow(5*sec, 10*time.Second) {
		t.Fatal("first event not allowed")
	}
	if r.allow(6*sec, 10*time.Second) {
		t.Fatal("second event within the interval allowed")
	}
	if !r.allow(16*sec, 10*time.Second) {
		t.Fatal("event after the interval not allowed")
	}
}

// TestFlowTableCap (item 8): one pod cannot grow its passthrough table
// past the cap; a flow already remembered is still refreshed.
func TestFlowTableCap(t *testing.T) {
	ft := newFlowTable()
	ft.limit = 3
	key := func(i int) flowKey {
		return flowKey{src: netip.MustParseAddrPort("10.0.0.1:1000"), dst: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), uint16(i))}
	}
	for i := range 3 {
		if _, ok := ft.promote(key(i), 0); !ok {
			t.Fatalf("flow %d not remembered below the cap", i)
		}
	}
	if _, ok := ft.promote(key(9), 0); ok {
		t.Fatal("flow remembered past the cap")
	}
	if _, ok := ft.promote(key(1), 5); !ok {
		t.Fatal("a remembered flow must stay remembered at the cap")
	}
	if n, _ := ft.sizes(); n != 3 {
		t.Fatalf("%d flows, want 3", n)
	}
}
