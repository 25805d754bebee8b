package observe

import (
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// value reads a counter or gauge.
func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

// TestLimiter: the agent, capture and per-user caps, each refusal
// counted under its limit, and slots given back once.
func TestLimiter(t *testing.T) {
	reg := prometheus.NewRegistry()
	l, err := newLimiter(Limits{Streams: 4, Captures: 1, PerUser: 3}, reg)
	if err != nil {
		t.Fatal(err)
	}
	take := func(user, kind string) func() {
		t.Helper()
		rel, err := l.acquire(user, kind)
		if err != nil {
			t.Fatalf("%s %s refused: %v", user, kind, err)
		}
		return rel
	}
	refused := func(user, kind, limit string) {
		t.Helper()
		before := value(t, l.refused.WithLabelValues(limit))
		if rel, err := l.acquire(user, kind); err == nil {
			rel()
			t.Fatalf("%s %s allowed past the %s limit", user, kind, limit)
		}
		if value(t, l.refused.WithLabelValues(limit)) != before+1 {
			t.Fatalf("refusal not counted under limit=%s", limit)
		}
	}
	capA := take("alice", "capture")
	refused("bob", "capture", "captures")
	tapA1, _ := take("alice", "tap"), take("alice", "tap")
	refused("alice", "tap", "user")
	tapB := take("bob", "tap")
	refused("carol", "tap", "agent")
	if got := value(t, l.open.WithLabelValues("tap")); got != 3 {
		t.Fatalf("open taps gauge %v, want 3", got)
	}
	capA()
	capA() // once only
	take("bob", "capture")
	tapA1()
	take("alice", "tap")
	tapB()
	if l.streams != 3 || l.captures != 1 || l.users["alice"] != 2 || l.users["bob"] != 1 {
		t.Fatalf("counts after releases: streams %d captures %d users %v", l.streams, l.captures, l.users)
	}
}

// TestTapRefusedPastTheLimit: past the per-user cap a tap is answered 503,
// and a slot comes back when a tap ends.
func TestTapRefusedPastTheLimit(t *testing.T) {
	e := newEnvWith(t, func(c *Config) { c.Limits = Limits{PerUser: 1} })
	first := e.get(t, "alice", TapPath+"?namespace=shop")
	if first.StatusCode != http.StatusOK {
		t.Fatalf("first tap: %d", first.StatusCode)
	}
	second := e.get(t, "alice", TapPath+"?namespace=shop")
	second.Body.Close()
	if second.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("second tap of the same user: %d, want 503", second.StatusCode)
	}
	first.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	for deadline := time.Now().Add(5 * time.Second); ; {
		r := e.get(t, "alice", TapPath+"?namespace=shop")
		r.Body.Close()
		if r.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the ended tap's slot never came back: %d", r.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
