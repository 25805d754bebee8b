package netpol

import (
	"cmp"
	"errors"
	"maps"
	"slices"

	networkingv1 "k8s.io/api/networking/v1"
)

// Snapshot is an immutable PolicySource and NamespaceSource built from
// plain objects: for tests, for `tunmeshctl authz`, and for an agent that
// rebuilds it on change and swaps it in atomically.
type Snapshot struct {
	policies   map[string][]*Policy // by namespace, sorted by name
	namespaces map[string]map[string]string
}

// NewSnapshot compiles policies and indexes them with the namespaces' labels
// (name -> labels). It always returns a usable Snapshot; the error joins the
// Compile errors of invalid policies, whose invalid parts match nothing.
func NewSnapshot(policies []*networkingv1.NetworkPolicy, namespaces map[string]map[string]string) (*Snapshot, error) {
	s := &Snapshot{
		policies:   make(map[string][]*Policy),
		namespaces: maps.Clone(namespaces),
	}
	var errs []error
	for _, np := range policies {
		p, err := Compile(np)
		if err != nil {
			errs = append(errs, err)
		}
		s.policies[p.namespace] = append(s.policies[p.namespace], p)
	}
	for _, ps := range s.policies {
		slices.SortFunc(ps, func(a, b *Policy) int { return cmp.Compare(a.name, b.name) })
	}
	return s, errors.Join(errs...)
}

// Policies implements PolicySource.
func (s *Snapshot) Policies(namespace string) []*Policy { return s.policies[namespace] }

// NamespaceLabels implements NamespaceSource.
func (s *Snapshot) NamespaceLabels(name string) (map[string]string, bool) {
	l, ok := s.namespaces[name]
	return l, ok
}
