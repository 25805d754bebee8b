package observe

import (
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Limits cap the streams (taps and captures) an agent serves at once. A
// capture may hold up to 16 MiB of queued packets and a tap its event
// buffer: without a cap, a few thousand taps or a handful of stalled
// captures would exhaust the agent's memory. Past a cap the call is
// refused with 503 and counted (tunmesh_observe_streams_refused_total).
type Limits struct {
	// Streams caps taps plus captures on the agent.
	Streams int
	// Captures caps the captures among them.
	Captures int
	// PerUser caps one user's streams on the agent (tap deploy/NAME opens
	// one per pod).
	PerUser int
}

// DefaultLimits: 8 captures hold at most 128 MiB of queued packets, 64
// taps of 128 events a few MiB.
var DefaultLimits = Limits{Streams: 64, Captures: 8, PerUser: 16}

// limiter counts the open streams.
type limiter struct {
	lim      Limits
	mu       sync.Mutex // guards the counts
	streams  int
	captures int
	users    map[string]int

	refused *prometheus.CounterVec
	open    *prometheus.GaugeVec
}

func newLimiter(lim Limits, reg prometheus.Registerer) (*limiter, error) {
	if lim.Streams == 0 {
		lim.Streams = DefaultLimits.Streams
	}
	if lim.Captures == 0 {
		lim.Captures = DefaultLimits.Captures
	}
	if lim.PerUser == 0 {
		lim.PerUser = DefaultLimits.PerUser
	}
	l := &limiter{lim: lim, users: map[string]int{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_observe_streams_refused_total", Help: "Taps and captures refused because a limit was reached (limit: agent, captures, user)."}, []string{"limit"}),
		open:    prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tunmesh_observe_streams", Help: "Taps and captures the agent serves now."}, []string{"kind"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{l.refused, l.open} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("observe metrics: %w", err)
			}
		}
	}
	return l, nil
}

// acquire takes a stream slot for user; release gives it back. When a
// limit is reached it returns a nil release and the refusal.
func (l *limiter) acquire(user, kind string) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var limit string
	switch {
	case l.streams >= l.lim.Streams:
		limit, err = "agent", fmt.Errorf("the agent serves %d taps and captures already (its limit): retry later", l.streams)
	case kind == "capture" && l.captures >= l.lim.Captures:
		limit, err = "captures", fmt.Errorf("the agent runs %d captures already (its limit): retry later", l.captures)
	case l.users[user] >= l.lim.PerUser:
		limit, err = "user", fmt.Errorf("user %q has %d taps and captures open on this agent (the limit per user)", user, l.users[user])
	}
	if err != nil {
		l.refused.WithLabelValues(limit).Inc()
		return nil, err
	}
	l.streams++
	if kind == "capture" {
		l.captures++
	}
	l.users[user]++
	l.open.WithLabelValues(kind).Inc()
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.streams--
			if kind == "capture" {
				l.captures--
			}
			if l.users[user]--; l.users[user] == 0 {
				delete(l.users, user)
			}
			l.open.WithLabelValues(kind).Dec()
		})
	}, nil
}
