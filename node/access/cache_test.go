package access

import (
	"context"
	"errors"
	"testing"
	"time"
)

// countingReviewer counts the reviews that reach it.
type countingReviewer struct {
	fakeReviewer
	tokenCalls, sarCalls int
}

func (c *countingReviewer) ReviewToken(ctx context.Context, token string) (User, error) {
	c.tokenCalls++
	return c.fakeReviewer.ReviewToken(ctx, token)
}

func (c *countingReviewer) Allowed(ctx context.Context, u User, a Attributes) (bool, string, error) {
	c.sarCalls++
	return c.fakeReviewer.Allowed(ctx, u, a)
}

// TestCachedReviewer: answers are reused within the kubelet's TTLs (a
// token 2 min, an allowed review 5 min, a refusal 30 s), per user and
// attributes; failures of the API are not kept.
func TestCachedReviewer(t *testing.T) {
	r := &countingReviewer{fakeReviewer: fakeReviewer{
		tokens: map[string]User{"tok-alice": {Name: "alice", Groups: []string{"devs"}}},
		grants: map[string][]Attributes{"alice": {{Subresource: Capture, Namespace: "shop"}}},
	}}
	c := NewCachedReviewer(r)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	ctx := context.Background()
	alice, err := c.ReviewToken(ctx, "tok-alice")
	for i := 0; i < 5; i++ {
		if u, err := c.ReviewToken(ctx, "tok-alice"); err != nil || u.Name != "alice" {
			t.Fatalf("cached token: %+v %v", u, err)
		}
		if _, err := c.ReviewToken(ctx, "bad"); !errors.Is(err, ErrUnauthenticated) {
			t.Fatalf("cached bad token: %v", err)
		}
	}
	if err != nil || r.tokenCalls != 2 {
		t.Fatalf("%d token reviews for 2 tokens (err %v)", r.tokenCalls, err)
	}
	shop, bank := Attributes{Capture, "shop", "web"}, Attributes{Capture, "bank", "web"}
	for i := 0; i < 5; i++ {
		if ok, _, _ := c.Allowed(ctx, alice, shop); !ok {
			t.Fatal("shop refused")
		}
		if ok, _, _ := c.Allowed(ctx, alice, bank); ok {
			t.Fatal("bank allowed")
		}
	}
	other := User{Name: "alice", Groups: []string{"devs", "admins"}}
	c.Allowed(ctx, other, shop) // other groups: another question
	if r.sarCalls != 3 {
		t.Fatalf("%d access reviews, want 3 (shop, bank, other groups)", r.sarCalls)
	}
	now = now.Add(DeniedTTL + time.Second) // the refusals expire, the grants stay
	c.ReviewToken(ctx, "tok-alice")
	c.ReviewToken(ctx, "bad")
	c.Allowed(ctx, alice, shop)
	c.Allowed(ctx, alice, bank)
	if r.tokenCalls != 3 || r.sarCalls != 4 {
		t.Fatalf("after 31s: %d token reviews (want 3), %d access reviews (want 4)", r.tokenCalls, r.sarCalls)
	}
	now = now.Add(AllowedTTL)
	c.ReviewToken(ctx, "tok-alice")
	c.Allowed(ctx, alice, shop)
	if r.tokenCalls != 4 || r.sarCalls != 5 {
		t.Fatalf("after the TTLs: %d token reviews, %d access reviews", r.tokenCalls, r.sarCalls)
	}
	r.err = errors.New("connection refused")
	now = now.Add(time.Hour)
	for i := 0; i < 2; i++ {
		if _, err := c.ReviewToken(ctx, "tok-alice"); err == nil || errors.Is(err, ErrUnauthenticated) {
			t.Fatalf("API down: %v", err)
		}
		if _, _, err := c.Allowed(ctx, alice, shop); err == nil {
			t.Fatal("API down: allowed")
		}
	}
	if r.tokenCalls != 6 || r.sarCalls != 7 {
		t.Fatalf("failures cached: %d token reviews, %d access reviews", r.tokenCalls, r.sarCalls)
	}
}
