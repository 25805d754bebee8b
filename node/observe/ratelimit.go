package observe

import (
	"net"
	"net/http"
	"sync"

	"golang.org/x/time/rate"
)

// Per-address request rate on the API (before authentication, so that a
// flood costs no reviews): any pod can reach <node-ip>:4192.
const (
	DefaultRatePerSecond = 5
	DefaultRateBurst     = 20
	maxRateAddresses     = 4096
)

// addrLimiter is a token bucket per remote IP.
type addrLimiter struct {
	every rate.Limit
	burst int

	mu sync.Mutex // guards m
	m  map[string]*rate.Limiter
}

func newAddrLimiter(perSecond float64, burst int) *addrLimiter {
	if perSecond <= 0 {
		perSecond = DefaultRatePerSecond
	}
	if burst <= 0 {
		burst = DefaultRateBurst
	}
	return &addrLimiter{every: rate.Limit(perSecond), burst: burst, m: map[string]*rate.Limiter{}}
}

// allow reports whether a request from remoteAddr may go on.
func (a *addrLimiter) allow(remoteAddr string) bool {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	a.mu.Lock()
	l := a.m[host]
	if l == nil {
		if len(a.m) >= maxRateAddresses {
			// Forget the full buckets (addresses that are not busy).
			for k, v := range a.m {
				if v.Tokens() >= float64(a.burst) {
					delete(a.m, k)
				}
			}
			if len(a.m) >= maxRateAddresses {
				clear(a.m)
			}
		}
		l = rate.NewLimiter(a.every, a.burst)
		a.m[host] = l
	}
	a.mu.Unlock()
	return l.Allow()
}

// wrap answers 429 to an address past its rate.
func (a *addrLimiter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.allow(r.RemoteAddr) {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "too many requests from this address", http.StatusTooManyRequests)
			return
		}
		next.ServeHTTP(w, r)
	})
}
