package authz

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// countingHandler counts log records by message.
type countingHandler struct {
	mu sync.Mutex
	n  map[string]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.n[r.Message]++
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }
func (h *countingHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n[msg]
}

const (
	msgDenied  = "connection denied by policy"
	msgSummary = "policy denials counted but not logged (too many distinct connections denied; see tunmesh_policy_denials_total)"
)

func newTestReporter(t *testing.T) (*Reporter, *countingHandler, *time.Time) {
	t.Helper()
	h := &countingHandler{n: map[string]int{}}
	r, err := NewReporter(prometheus.NewRegistry(), slog.New(h))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	return r, h, &now
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func conn(i int) (netip.AddrPort, netip.AddrPort) {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 16), byte(i >> 8)}), 1000+uint16(i&0xff)),
		netip.MustParseAddrPort("10.0.0.2:80")
}

// TestReporterTableFull (review finding 3): with the memory of reported
// connections full, a denial costs O(1): it is counted, not logged, and a
// summary line (at most one per summaryEvery) says how many were not
// logged. Retransmissions of remembered connections still count once.
func TestReporterTableFull(t *testing.T) {
	r, h, now := newTestReporter(t)
	d := Decision{Direction: "ingress", Kind: KindNetworkPolicy, Policy: "prod/deny-all", Reason: ReasonNetpolDefaultDeny}
	c := r.denials.WithLabelValues(AtSource, "ingress", KindNetworkPolicy, "prod", "deny-all", ReasonNetpolDefaultDeny)
	for i := range seenMax {
		src, dst := conn(i)
		if !r.Denied(AtSource, src, dst, d) {
			t.Fatalf("connection %d: not reported", i)
		}
	}
	if got := h.count(msgDenied); got != seenMax {
		t.Fatalf("%d denials logged while filling the table, want %d", got, seenMax)
	}
	if src, dst := conn(7); r.Denied(AtSource, src, dst, d) {
		t.Fatal("a remembered connection was reported again with the table full")
	}
	start := time.Now()
	const extra = 20000
	for i := seenMax; i < seenMax+extra; i++ {
		src, dst := conn(i)
		if !r.Denied(AtSource, src, dst, d) {
			t.Fatalf("connection %d past the cap: not reported", i)
		}
	}
	// The old table scanned 65,536 entries per call (2.36 ms each: 47 s
	// here); O(1) takes milliseconds. Generous for a loaded machine.
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("%d denials with the table full took %s", extra, el)
	}
	if got := counter(t, c); got != seenMax+extra {
		t.Fatalf("counter %v, want %d: denials past the cap must be counted", got, seenMax+extra)
	}
	if got := h.count(msgDenied); got != seenMax {
		t.Fatalf("%d denials logged, want %d: none past the cap", got, seenMax)
	}
	if got := h.count(msgSummary); got != 1 {
		t.Fatalf("%d summary lines within %s, want 1", got, summaryEvery)
	}
	*now = now.Add(summaryEvery)
	src, dst := conn(seenMax + extra)
	r.Denied(AtSource, src, dst, d)
	if got := h.count(msgSummary); got != 2 {
		t.Fatalf("%d summary lines after %s, want 2", got, summaryEvery)
	}
	// Two generations later the old connections are forgotten: logging
	// resumes.
	*now = now.Add(seenTTL)
	r.Denied(AtSource, src, dst, d) // rotates
	*now = now.Add(seenTTL)
	src, dst = conn(1)
	if !r.Denied(AtSource, src, dst, d) || h.count(msgDenied) != seenMax+1 {
		t.Fatalf("after 2×seenTTL: logged %d, want %d", h.count(msgDenied), seenMax+1)
	}
}

// TestReporterGenerations: a connection is remembered for exactly
// seenTTL across a generation swap.
func TestReporterGenerations(t *testing.T) {
	r, _, now := newTestReporter(t)
	d := Decision{Direction: "egress", Kind: KindNetworkPolicy, Policy: "prod/x", Reason: ReasonNetpolDefaultDeny}
	a, dst := conn(1)
	b, _ := conn(2)
	r.Denied(AtSource, a, dst, d)
	*now = now.Add(seenTTL - time.Second)
	r.Denied(AtSource, b, dst, d)
	*now = now.Add(2 * time.Second) // a: seenTTL+1s old, b: 2s (after a swap)
	if !r.Denied(AtSource, a, dst, d) {
		t.Fatal("a connection older than seenTTL was not reported again")
	}
	if r.Denied(AtSource, b, dst, d) {
		t.Fatal("a connection remembered in the previous generation was reported again within seenTTL")
	}
}

// TestDeniedStreamRateLimited (review finding 3): every denied stream is
// counted; the log says it once per (client, server) pair per
// streamEvery.
func TestDeniedStreamRateLimited(t *testing.T) {
	r, h, now := newTestReporter(t)
	d := Decision{Direction: "ingress", Kind: KindAuthorization, Policy: "prod/friends", Reason: ReasonNotAuthorized}
	c := r.denials.WithLabelValues(AtDestination, "ingress", KindAuthorization, "prod", "friends", ReasonNotAuthorized)
	cli, srv := netip.MustParseAddrPort("10.1.0.1:0"), netip.MustParseAddrPort("10.1.0.2:80")
	for range 100 {
		r.DeniedStream(cli, srv, d)
	}
	r.DeniedStream(netip.MustParseAddrPort("10.1.0.3:0"), srv, d)
	if got := counter(t, c); got != 101 {
		t.Fatalf("counter %v, want 101", got)
	}
	if got := h.count(msgDenied); got != 2 {
		t.Fatalf("%d lines logged, want 2 (one per pair)", got)
	}
	*now = now.Add(streamEvery)
	r.DeniedStream(cli, srv, d)
	if got := h.count(msgDenied); got != 3 {
		t.Fatalf("%d lines logged after %s, want 3", got, streamEvery)
	}
}

// TestPolicyDeletedDropsSeries (review finding 13): the series of a
// deleted policy are removed; those of another kind or name stay.
func TestPolicyDeletedDropsSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := NewReporter(reg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	src, dst := conn(1)
	for i, d := range []Decision{
		{Direction: "ingress", Kind: KindNetworkPolicy, Policy: "prod/gone", Reason: ReasonNetpolDefaultDeny},
		{Direction: "egress", Kind: KindNetworkPolicy, Policy: "prod/gone", Reason: ReasonNetpolDefaultDeny},
		{Direction: "ingress", Kind: KindAuthorization, Policy: "prod/gone", Reason: ReasonNotAuthorized},
		{Direction: "ingress", Kind: KindNetworkPolicy, Policy: "prod/kept", Reason: ReasonNetpolDefaultDeny},
	} {
		r.Denied(AtSource, src, netip.AddrPortFrom(dst.Addr(), uint16(i+1)), d)
	}
	r.PolicyDeleted(KindNetworkPolicy, "prod", "gone")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, mf := range mfs {
		if mf.GetName() != "tunmesh_policy_denials_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			left = append(left, l["kind"]+" "+l["policy_namespace"]+"/"+l["policy_name"])
		}
	}
	if len(left) != 2 || !slices.Contains(left, "authorization prod/gone") || !slices.Contains(left, "networkpolicy prod/kept") {
		t.Fatalf("series left %v, want the authorization of the same name and the other policy", left)
	}
}
