package clusterview

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/netpol"
)

// Pod returns the pod namespace/name from the view (nil when it is not
// known), ErrNotSynced before sync. The outbound and inbound policy checks
// read a local pod by name rather than by IP: its labels count before its
// kubelet has reported status.podIP.
func (v *View) Pod(namespace, name string) (*corev1.Pod, error) {
	if !v.Synced() {
		return nil, ErrNotSynced
	}
	obj, ok, err := v.podInf.GetIndexer().GetByKey(namespace + "/" + name)
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s: %w", namespace, name, err)
	}
	if !ok {
		return nil, nil
	}
	p, _ := obj.(*corev1.Pod)
	return p, nil
}

// InvalidReporter is told how many objects of a kind the agent could not
// use as written (authz.Reporter).
type InvalidReporter interface {
	SetInvalid(kind string, n int)
}

// DeletionReporter is optionally implemented by the InvalidReporter
// (authz.Reporter): told that a policy object was deleted, it drops the
// metric series that name it, so that deleted policies do not keep
// series forever (review finding 13). kind is authz.KindNetworkPolicy or
// authz.KindAuthorization.
type DeletionReporter interface {
	PolicyDeleted(kind, namespace, name string)
}

// Policies is the agent's view of NetworkPolicies and Authorizations,
// compiled when they change (netpol.Compile, authz.Compile) so that a
// decision costs a map lookup and the selectors' matching. It implements
// netpol.PolicySource and authz.Authorizations. A change is visible to the
// next decision as soon as the informer delivers it: connections opened
// after that are judged by the new rules; established ones are not cut.
// Nothing is trusted before Synced: the agent's gate holds flows until
// then.
type Policies struct {
	factory informers.SharedInformerFactory
	dynamic dynamicinformer.DynamicSharedInformerFactory
	npInf   cache.SharedIndexInformer
	azInf   cache.SharedIndexInformer
	report  InvalidReporter
	log     *slog.Logger
	synced  atomic.Bool
	// syncedC is closed when synced is set (SyncedC).
	syncedC chan struct{}
	// regs are the event handler registrations: an informer's HasSynced
	// says its store has listed, a registration's that the handler (the
	// rebuild of the compiled maps) has seen every listed object. Synced
	// before the maps caught up would admit flows with no isolation.
	regs []cache.ResourceEventHandlerRegistration

	mu       sync.RWMutex                      // guards the maps below
	netpols  map[string][]*netpol.Policy       // by namespace, sorted by name
	authzs   map[string][]*authz.Authorization // by namespace, sorted by name
	invalidN map[string]bool                   // "networkpolicy ns/name" | "authorization ns/name" -> invalid
}

// NewPolicies builds the informers (it starts nothing).
func NewPolicies(client kubernetes.Interface, dyn dynamic.Interface, report InvalidReporter, log *slog.Logger) (*Policies, error) {
	if client == nil || dyn == nil || report == nil || log == nil {
		return nil, errors.New("policy view: nil dependency")
	}
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(slimPolicy))
	df := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	p := &Policies{
		factory: f, dynamic: df,
		npInf:  f.Networking().V1().NetworkPolicies().Informer(),
		azInf:  df.ForResource(authz.GroupVersionResource).Informer(),
		report: report, log: log, syncedC: make(chan struct{}),
		netpols: map[string][]*netpol.Policy{}, authzs: map[string][]*authz.Authorization{}, invalidN: map[string]bool{},
	}
	// The dynamic informer comes with the namespace index already (adding
	// it again fails with "indexer conflict").
	if _, ok := p.azInf.GetIndexer().GetIndexers()[cache.NamespaceIndex]; !ok {
		if err := p.azInf.AddIndexers(cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}); err != nil {
			return nil, fmt.Errorf("policy view: index authorizations: %w", err)
		}
	}
	deleted, _ := report.(DeletionReporter)
	for _, h := range []struct {
		inf     cache.SharedIndexInformer
		kind    string
		rebuild func(ns string)
	}{{p.npInf, authz.KindNetworkPolicy, p.rebuildNetpols}, {p.azInf, authz.KindAuthorization, p.rebuildAuthzs}} {
		rebuild, kind := h.rebuild, h.kind
		on := func(obj any) (ns, name string) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			key, err := cache.MetaNamespaceKeyFunc(obj)
			if err != nil {
				return "", ""
			}
			ns, name, _ = cache.SplitMetaNamespaceKey(key)
			rebuild(ns)
			return ns, name
		}
		reg, err := h.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { on(o) },
			UpdateFunc: func(_, n any) { on(n) },
			DeleteFunc: func(o any) {
				if ns, name := on(o); name != "" && deleted != nil {
					deleted.PolicyDeleted(kind, ns, name)
				}
			},
		})
		if err != nil {
			return nil, fmt.Errorf("policy view: watch: %w", err)
		}
		p.regs = append(p.regs, reg)
	}
	return p, nil
}

// slimPolicy drops what decisions never read (managedFields, the
// last-applied copy) before a NetworkPolicy enters the cache.
func slimPolicy(obj any) (any, error) {
	if np, ok := obj.(*networkingv1.NetworkPolicy); ok {
		return &networkingv1.NetworkPolicy{TypeMeta: np.TypeMeta, ObjectMeta: slimMeta(&np.ObjectMeta), Spec: np.Spec}, nil
	}
	return obj, nil
}

// Run starts the informers, marks the view synced once both have listed,
// and blocks until ctx ends. Without the Authorization CRD installed the
// view never syncs (and the agent never claims a flow): fail closed.
func (p *Policies) Run(ctx context.Context) error {
	p.factory.Start(ctx.Done())
	p.dynamic.Start(ctx.Done())
	// Not synced is never silent: the usual cause is a missing CRD or
	// RBAC, and meanwhile the agent claims no flow.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	lastWarn := start
	for !p.handlersSynced() {
		select {
		case <-ctx.Done():
			p.factory.Shutdown()
			p.dynamic.Shutdown()
			return nil
		case now := <-tick.C:
			if now.Sub(lastWarn) >= 30*time.Second {
				lastWarn = now
				p.log.Warn("policy informers not synced yet: flows are held (is the Authorization CRD installed? may the agent list/watch networkpolicies and authorizations?)",
					"networkpolicies_synced", p.npInf.HasSynced(), "authorizations_synced", p.azInf.HasSynced(), "waited", now.Sub(start).Round(time.Second))
			}
		}
	}
	p.synced.Store(true)
	close(p.syncedC)
	p.log.Info("policy view synced", "networkpolicies", len(p.npInf.GetStore().ListKeys()), "authorizations", len(p.azInf.GetStore().ListKeys()))
	<-ctx.Done()
	p.factory.Shutdown()
	p.dynamic.Shutdown()
	return nil
}

// handlersSynced reports whether both informers have listed and their
// handlers have compiled every listed object.
func (p *Policies) handlersSynced() bool {
	for _, r := range p.regs {
		if !r.HasSynced() {
			return false
		}
	}
	return p.npInf.HasSynced() && p.azInf.HasSynced()
}

// Synced reports whether both informers have synced and their handlers
// have compiled what they listed.
func (p *Policies) Synced() bool { return p.synced.Load() }

// SyncedC returns a channel closed once Synced is true: waiters wake at
// the sync instead of polling.
func (p *Policies) SyncedC() <-chan struct{} { return p.syncedC }

// Policies implements netpol.PolicySource.
func (p *Policies) Policies(namespace string) []*netpol.Policy {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.netpols[namespace]
}

// Authorizations implements authz.Authorizations.
func (p *Policies) Authorizations(namespace string) []*authz.Authorization {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.authzs[namespace]
}

func (p *Policies) byNamespace(inf cache.SharedIndexInformer, ns string) []any {
	objs, err := inf.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
	if err != nil {
		// Only an unknown index name fails; both informers have it.
		p.log.Error("policy view: list by namespace", "namespace", ns, "err", err)
		return nil
	}
	return objs
}

// rebuildNetpols recompiles the namespace's NetworkPolicies from the cache.
func (p *Policies) rebuildNetpols(ns string) {
	var objs []*networkingv1.NetworkPolicy
	for _, o := range p.byNamespace(p.npInf, ns) {
		if np, ok := o.(*networkingv1.NetworkPolicy); ok {
			objs = append(objs, np)
		}
	}
	snap, err := netpol.NewSnapshot(objs, nil)
	compiled := snap.Policies(ns)
	bad := map[string]bool{}
	if err != nil {
		// Invalid parts match nothing (netpol.Compile); the API server
		// validates NetworkPolicy, so this means version skew.
		for _, np := range objs {
			if _, err := netpol.Compile(np); err != nil {
				bad["networkpolicy "+ns+"/"+np.Name] = true
				p.log.Warn("network policy partly unusable: its invalid parts match nothing", "policy", ns+"/"+np.Name, "err", err)
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(compiled) == 0 {
		delete(p.netpols, ns)
	} else {
		p.netpols[ns] = compiled
	}
	p.setInvalidLocked("networkpolicy", ns, bad)
}

// rebuildAuthzs recompiles the namespace's Authorizations from the cache.
// An object that does not convert or validate is kept as an invalid
// Authorization: it restricts the pods it selects and admits nothing.
func (p *Policies) rebuildAuthzs(ns string) {
	var objs []*authz.AuthorizationObject
	bad := map[string]bool{}
	for _, o := range p.byNamespace(p.azInf, ns) {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		obj, err := authz.FromUnstructured(u)
		if err != nil {
			bad["authorization "+ns+"/"+u.GetName()] = true
			p.log.Warn("authorization unusable: it admits nothing", "authorization", ns+"/"+u.GetName(), "err", err)
			// Keep what decides which pods it restricts, if it parses.
			obj = authz.Salvage(u)
		}
		objs = append(objs, obj)
	}
	idx, err := authz.NewIndex(objs)
	if err != nil {
		for _, a := range idx[ns] {
			if a.Invalid() && !bad["authorization "+a.String()] {
				bad["authorization "+a.String()] = true
				p.log.Warn("authorization invalid: it admits nothing", "authorization", a.String())
			}
		}
		p.log.Debug("authorization errors", "namespace", ns, "err", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(idx[ns]) == 0 {
		delete(p.authzs, ns)
	} else {
		p.authzs[ns] = idx[ns]
	}
	p.setInvalidLocked("authorization", ns, bad)
}

// setInvalidLocked replaces the namespace's invalid objects of kind and
// reports the new total.
func (p *Policies) setInvalidLocked(kind, ns string, bad map[string]bool) {
	prefix := kind + " " + ns + "/"
	n := 0
	for k := range p.invalidN {
		if len(k) > len(prefix) && k[:len(prefix)] == prefix {
			delete(p.invalidN, k)
		}
	}
	for k := range bad {
		p.invalidN[k] = true
	}
	for k := range p.invalidN {
		if len(k) > len(kind) && k[:len(kind)+1] == kind+" " {
			n++
		}
	}
	p.report.SetInvalid(kind, n)
}
