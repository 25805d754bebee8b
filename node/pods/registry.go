// Package pods is the agent's side of the CNI hand-off and the state of the
// meshed pods on this node: the registry of attached pods (by container, by
// NIC, by address), the small state files a restarted agent re-attaches
// from, and the CNI handler (ADD, DEL, CHECK, STATUS, GC) that fills them.
package pods

import (
	"net/netip"
	"slices"
	"sync"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/policy"
)

// Pod is a meshed pod attached on this node. It is immutable once in the
// Registry.
type Pod struct {
	ContainerID string
	Namespace   string
	Name        string
	Netns       string
	Addrs       []netip.Addr
	NIC         netstack.NICID
	ID          spiffe.ID
	Policy      policy.Policy
}

// FullName is "namespace/name".
func (p *Pod) FullName() string { return p.Namespace + "/" + p.Name }

// Registry indexes the meshed pods of this node. Safe for concurrent use.
type Registry struct {
	mu          sync.RWMutex // guards the maps
	byContainer map[string]*Pod
	byNIC       map[netstack.NICID]*Pod
	byAddr      map[netip.Addr]*Pod
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{byContainer: map[string]*Pod{}, byNIC: map[netstack.NICID]*Pod{}, byAddr: map[netip.Addr]*Pod{}}
}

// Add indexes p (replacing a pod with the same container ID).
func (r *Registry) Add(p *Pod) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.byContainer[p.ContainerID]; old != nil {
		r.removeLocked(old)
	}
	r.byContainer[p.ContainerID] = p
	r.byNIC[p.NIC] = p
	for _, a := range p.Addrs {
		r.byAddr[a] = p
	}
}

// Remove drops the pod of containerID and returns it (nil if unknown).
func (r *Registry) Remove(containerID string) *Pod {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.byContainer[containerID]
	if p != nil {
		r.removeLocked(p)
	}
	return p
}

func (r *Registry) removeLocked(p *Pod) {
	delete(r.byContainer, p.ContainerID)
	if r.byNIC[p.NIC] == p {
		delete(r.byNIC, p.NIC)
	}
	for _, a := range p.Addrs {
		if r.byAddr[a] == p {
			delete(r.byAddr, a)
		}
	}
}

// ByContainer returns the pod of a container ID, or nil.
func (r *Registry) ByContainer(id string) *Pod {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byContainer[id]
}

// ByNIC returns the pod attached as NIC id, or nil.
func (r *Registry) ByNIC(id netstack.NICID) *Pod {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byNIC[id]
}

// ByAddr returns the local pod holding a, or nil.
func (r *Registry) ByAddr(a netip.Addr) *Pod {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.byAddr[a.Unmap()]
}

// Identities returns the distinct identities of the local pods.
func (r *Registry) Identities() []spiffe.ID {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var ids []spiffe.ID
	for _, p := range r.byContainer {
		if !slices.Contains(ids, p.ID) {
			ids = append(ids, p.ID)
		}
	}
	return ids
}

// HasIdentity reports whether a local pod has identity id.
func (r *Registry) HasIdentity(id spiffe.ID) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, p := range r.byContainer {
		if p.ID == id {
			return true
		}
	}
	return false
}

// All returns the local pods, in no particular order.
func (r *Registry) All() []*Pod {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*Pod, 0, len(r.byContainer))
	for _, p := range r.byContainer {
		out = append(out, p)
	}
	return out
}

// Len is the number of local pods.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.byContainer)
}
