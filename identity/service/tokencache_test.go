package service

import (
	"testing"
	"time"
)

func TestTokenCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newTokenCache(10*time.Second, 2)
	if _, ok := c.get("a", now); ok {
		t.Fatal("empty cache hit")
	}
	c.put("a", "node-1", now)
	if n, ok := c.get("a", now.Add(9*time.Second)); !ok || n != "node-1" {
		t.Fatalf("get a = %q, %v", n, ok)
	}
	if _, ok := c.get("a", now.Add(10*time.Second)); ok {
		t.Fatal("hit after ttl")
	}
	c.put("b", "node-2", now)
	c.put("c", "node-3", now) // full of live entries: not cached
	if _, ok := c.get("c", now); ok {
		t.Fatal("cached beyond max")
	}
	c.put("d", "node-4", now.Add(11*time.Second)) // expired entries are swept first
	if n, ok := c.get("d", now.Add(11*time.Second)); !ok || n != "node-4" {
		t.Fatalf("get d = %q, %v", n, ok)
	}
}
