package authz

import (
	"cmp"
	"errors"
	"slices"
)

// Index is an Authorizations from compiled objects, by namespace and
// sorted by name. Immutable once built: for tests, tunmeshctl, and the
// agent's informer, which builds a new one per namespace on change.
type Index map[string][]*Authorization

// NewIndex compiles objects; the error joins the invalid ones' errors
// (those are indexed too: they admit nothing).
func NewIndex(objs []*AuthorizationObject) (Index, error) {
	idx := Index{}
	var errs []error
	for _, o := range objs {
		a, err := Compile(o)
		if err != nil {
			errs = append(errs, err)
		}
		idx[a.namespace] = append(idx[a.namespace], a)
	}
	for _, as := range idx {
		sortByName(as)
	}
	return idx, errors.Join(errs...)
}

func sortByName(as []*Authorization) {
	slices.SortFunc(as, func(a, b *Authorization) int { return cmp.Compare(a.name, b.name) })
}

// Authorizations implements Authorizations.
func (i Index) Authorizations(namespace string) []*Authorization { return i[namespace] }
