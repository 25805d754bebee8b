package spiffe

import (
	"errors"
	"testing"
)

// FuzzParse checks that Parse never panics, that every error wraps
// ErrInvalidID, and that accepted input has exactly one spelling: the ID's
// String() is the input and parses back to the same ID.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/default/sa/web",
		"spiffe://td/ns/a/sa/b.c",
		"spiffe://cluster.local:80/ns/a/sa/b",
		"spiffe://u@td/ns/a/sa/b",
		"spiffe://td/ns/a/sa/b?q#f",
		"spiffe://td/ns/a/sa/b/",
		"SPIFFE://TD/ns/a/sa/b",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidID) {
				t.Fatalf("Parse(%q) error %v does not wrap ErrInvalidID", s, err)
			}
			return
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("Parse(%q) accepted an ID that does not validate: %v", s, err)
		}
		if id.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, id.String())
		}
		again, err := Parse(id.String())
		if err != nil || again != id {
			t.Fatalf("round trip of %q: got %+v, %v; want %+v", s, again, err, id)
		}
		if u := id.URL().String(); u != s {
			t.Fatalf("URL().String() = %q, want %q", u, s)
		}
	})
}
