package access

import (
	"context"
	"crypto/sha256"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"
)

// Cache TTLs, as the kubelet's webhook authenticator and authorizer
// default them: a token's user for 2 minutes, an allowed review for 5, a
// refusal for 30 seconds. Failures (the API not answering) are not kept.
const (
	TokenTTL      = 2 * time.Minute
	AllowedTTL    = 5 * time.Minute
	DeniedTTL     = 30 * time.Second
	cacheCapacity = 4096
)

// CachedReviewer keeps the answers of Reviewer for the TTLs above, so that
// a caller's repeated calls (tap per pod, edges on every node, a
// reconnecting script) cost the API server one review each, not one per
// request. Safe for concurrent use.
type CachedReviewer struct {
	Reviewer Reviewer
	now      func() time.Time

	mu     sync.Mutex // guards the maps
	tokens map[[32]byte]tokenAnswer
	sars   map[string]sarAnswer
}

type tokenAnswer struct {
	u       User
	err     error // ErrUnauthenticated only
	expires time.Time
}

type sarAnswer struct {
	ok      bool
	reason  string
	expires time.Time
}

// NewCachedReviewer wraps r.
func NewCachedReviewer(r Reviewer) *CachedReviewer {
	return &CachedReviewer{Reviewer: r, now: time.Now, tokens: map[[32]byte]tokenAnswer{}, sars: map[string]sarAnswer{}}
}

// ReviewToken implements Reviewer. The token is kept only as its SHA-256.
func (c *CachedReviewer) ReviewToken(ctx context.Context, token string) (User, error) {
	k := sha256.Sum256([]byte(token))
	now := c.now()
	c.mu.Lock()
	a, ok := c.tokens[k]
	c.mu.Unlock()
	if ok && now.Before(a.expires) {
		return a.u, a.err
	}
	u, err := c.Reviewer.ReviewToken(ctx, token)
	if err != nil && !errors.Is(err, ErrUnauthenticated) {
		return u, err
	}
	ttl := TokenTTL
	if err != nil {
		ttl = DeniedTTL
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.tokens) >= cacheCapacity {
		prune(c.tokens, now, func(a tokenAnswer) time.Time { return a.expires })
	}
	c.tokens[k] = tokenAnswer{u: u, err: err, expires: now.Add(ttl)}
	return u, err
}

// Allowed implements Reviewer.
func (c *CachedReviewer) Allowed(ctx context.Context, u User, a Attributes) (bool, string, error) {
	k := sarKey(u, a)
	now := c.now()
	c.mu.Lock()
	ans, ok := c.sars[k]
	c.mu.Unlock()
	if ok && now.Before(ans.expires) {
		return ans.ok, ans.reason, nil
	}
	allowed, reason, err := c.Reviewer.Allowed(ctx, u, a)
	if err != nil {
		return false, "", err
	}
	ttl := AllowedTTL
	if !allowed {
		ttl = DeniedTTL
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sars) >= cacheCapacity {
		prune(c.sars, now, func(a sarAnswer) time.Time { return a.expires })
	}
	c.sars[k] = sarAnswer{ok: allowed, reason: reason, expires: now.Add(ttl)}
	return allowed, reason, nil
}

// prune drops the expired answers, and everything if none had expired
// (the cache is a bound, not a promise).
func prune[K comparable, V any](m map[K]V, now time.Time, expires func(V) time.Time) {
	n := len(m)
	for k, v := range m {
		if !now.Before(expires(v)) {
			delete(m, k)
		}
	}
	if len(m) == n {
		clear(m)
	}
}

// sarKey is everything a SubjectAccessReview is asked about.
func sarKey(u User, a Attributes) string {
	var b strings.Builder
	for _, s := range []string{u.Name, u.UID, a.Subresource, a.Namespace, a.Name} {
		b.WriteString(s)
		b.WriteByte(0)
	}
	for _, g := range u.Groups {
		b.WriteString(g)
		b.WriteByte(1)
	}
	keys := make([]string, 0, len(u.Extra))
	for k := range u.Extra {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		b.WriteString(k)
		b.WriteByte(2)
		for _, v := range u.Extra[k] {
			b.WriteString(v)
			b.WriteByte(3)
		}
	}
	return b.String()
}
