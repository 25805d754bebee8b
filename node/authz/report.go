package authz

import (
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Where a denial was enforced (metric label enforced_at).
const (
	AtSource      = "source"      // the client's agent, before accepting the pod's SYN
	AtDestination = "destination" // the server's agent, on the tunnel's verified identity
	AtPlaintext   = "plaintext"   // the server's agent, on a meshed pod's reply to a plaintext peer
)

// Reporter counts and logs denials, once per connection: a held SYN is
// retransmitted and decided again, and each retry must not count again.
// Safe for concurrent use. Every call is O(1) (a port scan reaches it once
// per SYN, on the packet path): the memory of reported connections is two
// generations swapped every seenTTL, with a hard cap; when it is full a
// denial is still counted but not logged, and a summary line says how
// many went unlogged (at most one per summaryEvery).
type Reporter struct {
	denials *prometheus.CounterVec
	invalid *prometheus.GaugeVec
	log     *slog.Logger
	now     func() time.Time

	mu         sync.Mutex // guards the fields below
	conns      seenSet    // connections reported (Denied)
	streams    seenSet    // (client, server) address pairs logged (DeniedStream)
	unlogged   int        // denials counted but not logged since lastSummary
	lastSumm   time.Time
	summLogged bool
}

type connKey struct {
	at       string
	src, dst netip.AddrPort
}

// seenTTL outlasts a client's SYN retransmissions (Linux gives up after
// about 127 s); seenMax bounds the memory a SYN flood can take.
// streamEvery is how often a denied stream is logged per pair of pods
// (each stream is counted). summaryEvery spaces the lines about denials
// that were counted but not logged.
const (
	seenTTL      = 3 * time.Minute
	seenMax      = 1 << 16
	streamEvery  = 10 * time.Second
	summaryEvery = 10 * time.Second
)

// seenSet remembers keys for ttl in two generations: cur takes new keys,
// prev is what cur was up to ttl ago; both are dropped whole. A key's
// time is kept so that the window is exactly ttl. At most max keys in
// all.
type seenSet struct {
	ttl       time.Duration
	max       int
	cur, prev map[connKey]time.Time
	rotated   time.Time
}

func newSeenSet(ttl time.Duration, max int) seenSet {
	return seenSet{ttl: ttl, max: max, cur: map[connKey]time.Time{}, prev: map[connKey]time.Time{}}
}

// first reports whether k was not seen within ttl, and records it; full
// is set when it could not be recorded (the caller reports without
// logging).
func (s *seenSet) first(k connKey, now time.Time) (first, full bool) {
	if s.rotated.IsZero() {
		s.rotated = now
	}
	if now.Sub(s.rotated) >= s.ttl {
		// Everything in prev is older than ttl now.
		s.prev, s.cur = s.cur, map[connKey]time.Time{}
		if now.Sub(s.rotated) >= 2*s.ttl {
			clear(s.prev)
		}
		s.rotated = now
	}
	if t, ok := s.cur[k]; ok && now.Sub(t) < s.ttl {
		return false, false
	}
	if t, ok := s.prev[k]; ok && now.Sub(t) < s.ttl {
		return false, false
	}
	if len(s.cur)+len(s.prev) >= s.max {
		return true, true
	}
	s.cur[k] = now
	return true, false
}

// NewReporter registers the policy series on reg:
//
//	tunmesh_policy_denials_total{enforced_at, direction, kind, policy_namespace, policy_name, reason}
//	tunmesh_policy_invalid_objects{kind}
//
// The labels are bounded by the cluster's policy objects (and the five
// default inbound policy values per namespace).
func NewReporter(reg prometheus.Registerer, log *slog.Logger) (*Reporter, error) {
	r := &Reporter{
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_policy_denials_total",
			Help: "Connections denied by NetworkPolicy, Authorization or default inbound policy, once per connection.",
		}, []string{"enforced_at", "direction", "kind", "policy_namespace", "policy_name", "reason"}),
		invalid: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tunmesh_policy_invalid_objects",
			Help: "Policy objects the agent could not use as written (an invalid Authorization admits nothing; invalid NetworkPolicy parts match nothing).",
		}, []string{"kind"}),
		log:     log,
		now:     time.Now,
		conns:   newSeenSet(seenTTL, seenMax),
		streams: newSeenSet(streamEvery, seenMax/4),
	}
	for _, c := range []prometheus.Collector{r.denials, r.invalid} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// PolicyDeleted drops the denial series naming the deleted policy object
// (clusterview.DeletionReporter): a deleted policy denies nothing more,
// and its series must not stay forever.
func (r *Reporter) PolicyDeleted(kind, namespace, name string) {
	r.denials.DeletePartialMatch(prometheus.Labels{"kind": kind, "policy_namespace": namespace, "policy_name": name})
}

// SetInvalid sets the number of unusable objects of a kind.
func (r *Reporter) SetInvalid(kind string, n int) { r.invalid.WithLabelValues(kind).Set(float64(n)) }

// Denied counts and logs d for the connection src -> dst, unless the same
// connection was reported within seenTTL. It reports whether this was the
// first report. When the memory of reported connections is full the
// denial is counted but not logged (summarized).
func (r *Reporter) Denied(at string, src, dst netip.AddrPort, d Decision, attrs ...any) bool {
	now := r.now()
	r.mu.Lock()
	first, full := r.conns.first(connKey{at: at, src: src, dst: dst}, now)
	if !first {
		r.mu.Unlock()
		return false
	}
	if full {
		r.noteUnlogged(now)
	}
	r.mu.Unlock()
	r.denials.WithLabelValues(at, d.Direction, d.Kind, d.PolicyNamespace(), d.PolicyName(), d.Reason).Inc()
	if !full {
		r.logDenied(at, src, dst, d, attrs)
	}
	return true
}

// noteUnlogged counts a denial that is not logged and, at most once per
// summaryEvery, logs how many were (since the previous summary). Called
// with r.mu held.
func (r *Reporter) noteUnlogged(now time.Time) {
	r.unlogged++
	if r.summLogged && now.Sub(r.lastSumm) < summaryEvery {
		return
	}
	r.log.Warn("policy denials counted but not logged (too many distinct connections denied; see tunmesh_policy_denials_total)",
		"unlogged", r.unlogged)
	r.unlogged, r.lastSumm, r.summLogged = 0, now, true
}

func (r *Reporter) logDenied(at string, src, dst netip.AddrPort, d Decision, attrs []any) {
	r.log.Info("connection denied by policy", append([]any{"enforced_at", at, "src", src.String(), "dst", dst.String(),
		"direction", d.Direction, "kind", d.Kind, "policy", d.Policy, "reason", d.Reason, "detail", d.Detail}, attrs...)...)
}

// DeniedStream counts and logs a denial at the destination agent. A
// tunnel stream is one connection attempt (no retransmissions reach it),
// so each is counted; the log is rate-limited to one line per pair of
// addresses (client pod, server pod) per streamEvery, so that a client
// retrying in a loop cannot flood the log.
func (r *Reporter) DeniedStream(src, dst netip.AddrPort, d Decision, attrs ...any) {
	now := r.now()
	r.mu.Lock()
	first, full := r.streams.first(connKey{at: AtDestination, src: netip.AddrPortFrom(src.Addr(), 0), dst: netip.AddrPortFrom(dst.Addr(), 0)}, now)
	if full {
		r.noteUnlogged(now)
	}
	r.mu.Unlock()
	r.denials.WithLabelValues(AtDestination, d.Direction, d.Kind, d.PolicyNamespace(), d.PolicyName(), d.Reason).Inc()
	if first && !full {
		r.logDenied(AtDestination, src, dst, d, attrs)
	}
}
