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
// Safe for concurrent use.
type Reporter struct {
	denials *prometheus.CounterVec
	invalid *prometheus.GaugeVec
	log     *slog.Logger
	now     func() time.Time

	mu   sync.Mutex // guards seen
	seen map[connKey]time.Time
}

type connKey struct {
	at       string
	src, dst netip.AddrPort
}

// seenTTL outlasts a client's SYN retransmissions (Linux gives up after
// about 127 s); seenMax bounds the memory a SYN flood can take.
const (
	seenTTL = 3 * time.Minute
	seenMax = 1 << 16
)

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
		log:  log,
		now:  time.Now,
		seen: map[connKey]time.Time{},
	}
	for _, c := range []prometheus.Collector{r.denials, r.invalid} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// SetInvalid sets the number of unusable objects of a kind.
func (r *Reporter) SetInvalid(kind string, n int) { r.invalid.WithLabelValues(kind).Set(float64(n)) }

// Denied counts and logs d for the connection src -> dst, unless the same
// connection was reported within seenTTL. It reports whether this was the
// first report.
func (r *Reporter) Denied(at string, src, dst netip.AddrPort, d Decision, attrs ...any) bool {
	k := connKey{at: at, src: src, dst: dst}
	now := r.now()
	r.mu.Lock()
	if t, ok := r.seen[k]; ok && now.Sub(t) < seenTTL {
		r.mu.Unlock()
		return false
	}
	if len(r.seen) >= seenMax {
		for k, t := range r.seen {
			if now.Sub(t) >= seenTTL {
				delete(r.seen, k)
			}
		}
	}
	if len(r.seen) < seenMax {
		r.seen[k] = now
	}
	r.mu.Unlock()
	r.denials.WithLabelValues(at, d.Direction, d.Kind, d.PolicyNamespace(), d.PolicyName(), d.Reason).Inc()
	r.log.Info("connection denied by policy", append([]any{"enforced_at", at, "src", src.String(), "dst", dst.String(),
		"direction", d.Direction, "kind", d.Kind, "policy", d.Policy, "reason", d.Reason, "detail", d.Detail}, attrs...)...)
	return true
}

// DeniedStream counts and logs a denial at the destination agent. A
// tunnel stream is one connection attempt (no retransmissions reach it),
// so nothing is deduplicated.
func (r *Reporter) DeniedStream(src, dst netip.AddrPort, d Decision, attrs ...any) {
	r.denials.WithLabelValues(AtDestination, d.Direction, d.Kind, d.PolicyNamespace(), d.PolicyName(), d.Reason).Inc()
	r.log.Info("connection denied by policy", append([]any{"enforced_at", AtDestination, "src", src.String(), "dst", dst.String(),
		"direction", d.Direction, "kind", d.Kind, "policy", d.Policy, "reason", d.Reason, "detail", d.Detail}, attrs...)...)
}
