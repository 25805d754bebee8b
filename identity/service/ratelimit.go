package service

import (
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/tunmesh/tunmesh/identity/api"
)

// clientLimiter rate-limits requests per client address, before any
// TokenReview is spent on them: one misbehaving or compromised node must
// not starve the others (agents ask once per identity and refresh at 70%
// of a 24 h lifetime, so the limit is far above legitimate use).
type clientLimiter struct {
	rate  rate.Limit
	burst int
	max   int // clients remembered; past it idle ones are forgotten

	mu      sync.Mutex // guards clients
	clients map[netip.Addr]*clientRate
}

type clientRate struct {
	lim  *rate.Limiter
	seen time.Time
}

func newClientLimiter(r rate.Limit, burst, max int) *clientLimiter {
	return &clientLimiter{rate: r, burst: burst, max: max, clients: map[netip.Addr]*clientRate{}}
}

func (l *clientLimiter) allow(addr netip.Addr, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.clients[addr]
	if c == nil {
		if len(l.clients) >= l.max {
			for a, o := range l.clients {
				if now.Sub(o.seen) > time.Minute {
					delete(l.clients, a)
				}
			}
			if len(l.clients) >= l.max {
				return false // a flood of distinct addresses: refuse newcomers
			}
		}
		c = &clientRate{lim: rate.NewLimiter(l.rate, l.burst)}
		l.clients[addr] = c
	}
	c.seen = now
	return c.lim.AllowN(now, 1)
}

// limit wraps h: requests over a client's rate get 429 with code
// rate_limited, counted in the refusals metric.
func (s *Service) limit(l *clientLimiter, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		addr, _ := netip.ParseAddr(host)
		if !l.allow(addr.Unmap(), s.now()) {
			s.metrics.refusals.WithLabelValues(string(api.CodeRateLimited)).Inc()
			writeJSON(w, http.StatusTooManyRequests, &api.Error{Code: api.CodeRateLimited, Message: "too many requests from " + host})
			return
		}
		h.ServeHTTP(w, r)
	})
}
