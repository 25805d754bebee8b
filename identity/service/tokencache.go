package service

import (
	"crypto/sha256"
	"sync"
	"time"
)

// tokenCache remembers the node of recently authenticated agent tokens, so
// that an agent renewing many identities costs one TokenReview rather than
// one per certificate. Only successes are cached, by SHA-256 of the token
// (the token itself is not kept), for at most ttl: the same delay the API
// server's own token cache has before a revoked token stops working.
type tokenCache struct {
	ttl time.Duration
	max int

	mu      sync.Mutex // guards entries
	entries map[[32]byte]cachedToken
}

type cachedToken struct {
	node    string
	expires time.Time
}

func newTokenCache(ttl time.Duration, max int) *tokenCache {
	return &tokenCache{ttl: ttl, max: max, entries: map[[32]byte]cachedToken{}}
}

func (c *tokenCache) get(token string, now time.Time) (string, bool) {
	k := sha256.Sum256([]byte(token))
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[k]
	if !ok || !now.Before(e.expires) {
		return "", false
	}
	return e.node, true
}

func (c *tokenCache) put(token, node string, now time.Time) {
	k := sha256.Sum256([]byte(token))
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= c.max {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		if len(c.entries) >= c.max {
			return // full of live entries: do not cache rather than evict at random
		}
	}
	c.entries[k] = cachedToken{node: node, expires: now.Add(c.ttl)}
}
