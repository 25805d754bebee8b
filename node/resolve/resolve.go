// Package resolve maps a Service's ClusterIP:port to one ready endpoint,
// from the Service and EndpointSlice informers, as kube-proxy would but in
// the agent: the mesh must know the destination pod (for its identity and
// node) before it dials, so it resolves ClusterIPs itself. Endpoints are
// balanced with the power of two choices on active streams.
package resolve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// ErrNoEndpoints means the Service has no ready endpoint for the port.
var ErrNoEndpoints = errors.New("no ready endpoints")

// Endpoint is one backend of a Service port.
type Endpoint struct {
	Addr netip.AddrPort
	Pod  types.NamespacedName // from the slice's targetRef; empty if none
	Node string
}

// servicePort identifies a port of a Service by its name.
type servicePort struct {
	svc  types.NamespacedName
	name string
}

// Resolver answers Resolve from its informers. New starts nothing; Run
// starts the informers and blocks until ctx ends.
type Resolver struct {
	client kubernetes.Interface
	log    *slog.Logger

	mu     sync.RWMutex                                                   // guards the maps below
	vips   map[netip.AddrPort]servicePort                                 // ClusterIP:port -> service port (TCP)
	dvips  map[datagramVIP]servicePort                                    // UDP and SCTP ClusterIP:port (datagram.go)
	slices map[types.NamespacedName]map[string]*discoveryv1.EndpointSlice // service -> slice name -> slice
	active map[netip.AddrPort]*atomic.Int64
	ports  map[types.NamespacedName]map[uint16]string // service -> port number -> port name
	synced atomic.Bool
}

// New checks its dependencies.
func New(client kubernetes.Interface, log *slog.Logger) (*Resolver, error) {
	if client == nil || log == nil {
		return nil, errors.New("resolver: nil client or logger")
	}
	return &Resolver{
		client: client, log: log,
		vips:   map[netip.AddrPort]servicePort{},
		dvips:  map[datagramVIP]servicePort{},
		slices: map[types.NamespacedName]map[string]*discoveryv1.EndpointSlice{},
		active: map[netip.AddrPort]*atomic.Int64{},
		ports:  map[types.NamespacedName]map[uint16]string{},
	}, nil
}

// Run watches Services and EndpointSlices until ctx ends.
func (r *Resolver) Run(ctx context.Context) error {
	// The transform runs before objects enter the caches (see slim.go).
	factory := informers.NewSharedInformerFactoryWithOptions(r.client, 0, informers.WithTransform(slim))
	svcInf := factory.Core().V1().Services().Informer()
	epsInf := factory.Discovery().V1().EndpointSlices().Informer()
	if _, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { r.setService(o, false) },
		UpdateFunc: func(old, o any) { r.setService(old, true); r.setService(o, false) },
		DeleteFunc: func(o any) { r.setService(o, true) },
	}); err != nil {
		return fmt.Errorf("watch services: %w", err)
	}
	if _, err := epsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { r.setSlice(o, false) },
		UpdateFunc: func(_, o any) { r.setSlice(o, false) },
		DeleteFunc: func(o any) { r.setSlice(o, true) },
	}); err != nil {
		return fmt.Errorf("watch endpointslices: %w", err)
	}
	factory.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), svcInf.HasSynced, epsInf.HasSynced) {
		r.synced.Store(true)
	}
	<-ctx.Done()
	factory.Shutdown()
	return nil
}

// Synced reports whether the informers have synced.
func (r *Resolver) Synced() bool { return r.synced.Load() }

func unwrap(o any) any {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		return d.Obj
	}
	return o
}

func (r *Resolver) setService(o any, remove bool) {
	svc, ok := unwrap(o).(*corev1.Service)
	if !ok {
		return
	}
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	r.mu.Lock()
	defer r.mu.Unlock()
	if remove {
		delete(r.ports, key)
	} else {
		m := map[uint16]string{}
		for _, p := range svc.Spec.Ports {
			if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
				m[uint16(p.Port)] = p.Name
			}
		}
		r.ports[key] = m
	}
	for _, ip := range svc.Spec.ClusterIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			continue // "None" for headless services
		}
		for _, p := range svc.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				r.setDatagramVIP(a, p, key, remove)
				continue
			}
			vip := netip.AddrPortFrom(a, uint16(p.Port))
			if remove {
				delete(r.vips, vip)
			} else {
				r.vips[vip] = servicePort{svc: key, name: p.Name}
			}
		}
	}
}

func (r *Resolver) setSlice(o any, remove bool) {
	s, ok := unwrap(o).(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return
	}
	key := types.NamespacedName{Namespace: s.Namespace, Name: name}
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.slices[key]
	if remove {
		delete(m, s.Name)
		if len(m) == 0 {
			delete(r.slices, key)
		}
		return
	}
	if m == nil {
		m = map[string]*discoveryv1.EndpointSlice{}
		r.slices[key] = m
	}
	m[s.Name] = s
}

// IsService reports whether dst is a known ClusterIP:port.
func (r *Resolver) IsService(dst netip.AddrPort) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	_, ok := r.vips[dst]
	return ok
}

// Resolve picks a ready endpoint for the ClusterIP:port dst. ok is false
// when dst is not a Service; ErrNoEndpoints when it has no usable endpoint.
func (r *Resolver) Resolve(dst netip.AddrPort) (ep Endpoint, ok bool, err error) {
	eps, ok, err := r.Candidates(dst)
	if !ok || err != nil {
		return Endpoint{}, ok, err
	}
	return r.Pick(eps), true, nil
}

// Candidates returns the endpoints kube-proxy would choose from for the
// ClusterIP:port dst: the ready ones or, when none is ready, the ones that
// are serving while terminating (kube-proxy's fallback, so that a rolling
// update does not drop connections). ok is false when dst is not a
// Service; ErrNoEndpoints when it has no usable endpoint.
func (r *Resolver) Candidates(dst netip.AddrPort) (eps []Endpoint, ok bool, err error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	sp, ok := r.vips[dst]
	if !ok {
		return nil, false, nil
	}
	eps = r.candidatesLocked(sp, func(a netip.Addr) bool { return a.Is4() == dst.Addr().Is4() })
	if len(eps) == 0 {
		return nil, true, fmt.Errorf("service %s port %q: %w", sp.svc, sp.name, ErrNoEndpoints)
	}
	return eps, true, nil
}

// ServiceEndpoints returns the usable endpoints (as Candidates) of the
// Service svc's TCP port, by the Service's port number, of any family. It
// lets the agent reach a Service (tunmesh-identity) from the host network
// without cluster DNS or kube-proxy.
func (r *Resolver) ServiceEndpoints(svc types.NamespacedName, port uint16) ([]Endpoint, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	name, ok := r.ports[svc][port]
	if !ok {
		return nil, fmt.Errorf("service %s has no TCP port %d: %w", svc, port, ErrNoEndpoints)
	}
	eps := r.candidatesLocked(servicePort{svc: svc, name: name}, func(netip.Addr) bool { return true })
	if len(eps) == 0 {
		return nil, fmt.Errorf("service %s port %d: %w", svc, port, ErrNoEndpoints)
	}
	return eps, nil
}

// candidatesLocked lists the ready endpoints of sp or, when none is ready,
// the serving terminating ones, of the addresses family accepts.
func (r *Resolver) candidatesLocked(sp servicePort, family func(netip.Addr) bool) []Endpoint {
	var ready, terminating []Endpoint
	for _, s := range r.slices[sp.svc] {
		port, found := slicePort(s, sp.name)
		if !found {
			continue
		}
		for _, e := range s.Endpoints {
			isReady := e.Conditions.Ready == nil || *e.Conditions.Ready
			servingTerminating := !isReady && e.Conditions.Serving != nil && *e.Conditions.Serving &&
				e.Conditions.Terminating != nil && *e.Conditions.Terminating
			if !isReady && !servingTerminating {
				continue
			}
			for _, a := range e.Addresses {
				addr, err := netip.ParseAddr(a)
				if err != nil || !family(addr) {
					continue
				}
				cand := Endpoint{Addr: netip.AddrPortFrom(addr, port)}
				if e.NodeName != nil {
					cand.Node = *e.NodeName
				}
				if e.TargetRef != nil && e.TargetRef.Kind == "Pod" {
					cand.Pod = types.NamespacedName{Namespace: e.TargetRef.Namespace, Name: e.TargetRef.Name}
				}
				if isReady {
					ready = append(ready, cand)
				} else {
					terminating = append(terminating, cand)
				}
			}
		}
	}
	if len(ready) == 0 {
		return terminating
	}
	return ready
}

func slicePort(s *discoveryv1.EndpointSlice, name string) (uint16, bool) {
	for _, p := range s.Ports {
		if p.Port == nil {
			continue
		}
		if (p.Name == nil && name == "") || (p.Name != nil && *p.Name == name) {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}

// Pick applies the power of two choices: two random endpoints, the one
// with fewer active streams wins. eps must not be empty.
func (r *Resolver) Pick(eps []Endpoint) Endpoint {
	if len(eps) == 1 {
		return eps[0]
	}
	i := rand.IntN(len(eps))
	j := rand.IntN(len(eps) - 1)
	if j >= i {
		j++
	}
	if r.load(eps[j].Addr) < r.load(eps[i].Addr) {
		return eps[j]
	}
	return eps[i]
}

func (r *Resolver) counter(a netip.AddrPort) *atomic.Int64 {
	r.mu.RLock()
	c := r.active[a]
	r.mu.RUnlock()
	if c != nil {
		return c
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c = r.active[a]; c == nil {
		c = new(atomic.Int64)
		r.active[a] = c
	}
	return c
}

func (r *Resolver) load(a netip.AddrPort) int64 { return r.counter(a).Load() }

// Track counts one active stream to ep until the returned func is called.
func (r *Resolver) Track(ep Endpoint) (done func()) {
	c := r.counter(ep.Addr)
	c.Add(1)
	var once sync.Once
	return func() { once.Do(func() { c.Add(-1) }) }
}
