package observe

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestRateLimitPerAddress: past its burst an address gets 429 before any
// authentication; another address is not affected.
func TestRateLimitPerAddress(t *testing.T) {
	e := newEnvWith(t, func(c *Config) { c.RatePerSecond, c.RateBurst = 0.001, 3 })
	call := func(remote string) int {
		r := httptest.NewRequest("GET", EdgesPath+"?namespace=shop", nil)
		r.RemoteAddr = remote
		r.Header.Set("Authorization", "Bearer alice")
		w := httptest.NewRecorder()
		e.h.ServeHTTP(w, r)
		return w.Code
	}
	for i := 0; i < 3; i++ {
		if code := call("10.0.0.9:1234"); code != http.StatusOK {
			t.Fatalf("request %d: %d", i, code)
		}
	}
	if code := call("10.0.0.9:5678"); code != http.StatusTooManyRequests {
		t.Fatalf("past the burst (another port, same address): %d, want 429", code)
	}
	if code := call("10.0.0.10:1234"); code != http.StatusOK {
		t.Fatalf("another address: %d", code)
	}
}
