// Package clusterview is the agent's read-only view of the cluster: every
// pod by IP (to find a destination pod's identity and node, and to check a
// tunnel client's source) and every namespace (for namespace annotations),
// from informers. Nothing here is trusted before Synced: an empty view
// would make every peer look unmeshed, so callers hold or refuse until then.
package clusterview

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// ErrNotSynced is returned by lookups before the informers have synced.
var ErrNotSynced = errors.New("cluster view not synced")

const byIP = "podIP"

// View answers lookups from its informers. New builds the informers; Run
// starts them and blocks until ctx ends.
type View struct {
	factory informers.SharedInformerFactory
	podInf  cache.SharedIndexInformer
	nsInf   cache.SharedIndexInformer
	nsList  listersv1.NamespaceLister
	synced  atomic.Bool
	syncCh  chan struct{} // closed once synced

	changed broadcast // pod events, for callers waiting to learn a pod
}

// broadcast wakes every waiter at once: C returns a channel that the next
// Notify closes. Safe for concurrent use.
type broadcast struct {
	mu sync.Mutex    // guards ch
	ch chan struct{} // closed by the next Notify; nil until someone waits
}

// C returns a channel closed at the next Notify.
func (b *broadcast) C() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

// Notify wakes the current waiters.
func (b *broadcast) Notify() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
		b.ch = nil
	}
}

// New builds the informers (it starts nothing).
func New(client kubernetes.Interface) (*View, error) {
	if client == nil {
		return nil, errors.New("cluster view: nil client")
	}
	// The transform runs before objects enter the caches (see slim.go).
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(slim))
	inf := f.Core().V1().Pods().Informer()
	if err := inf.AddIndexers(cache.Indexers{byIP: indexPodIPs}); err != nil {
		return nil, fmt.Errorf("cluster view: index pods: %w", err)
	}
	ns := f.Core().V1().Namespaces()
	v := &View{factory: f, podInf: inf, nsInf: ns.Informer(), nsList: ns.Lister(), syncCh: make(chan struct{})}
	// Wake waiters on every pod event: the inbound checks wait (bounded)
	// for a pod whose IP the kubelet has not reported yet.
	notify := func(any) { v.changed.Notify() }
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: notify, UpdateFunc: func(_, n any) { notify(n) }, DeleteFunc: notify,
	}); err != nil {
		return nil, fmt.Errorf("cluster view: watch pods: %w", err)
	}
	return v, nil
}

// Changed returns a channel closed at the next pod event (or at sync):
// a caller that did not find a pod waits on it, then looks again.
func (v *View) Changed() <-chan struct{} { return v.changed.C() }

// indexPodIPs indexes pods that may hold their IPs: not hostNetwork (their
// IP is the node's) and not finished.
func indexPodIPs(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil, nil
	}
	ips := make([]string, 0, len(p.Status.PodIPs))
	for _, ip := range p.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	return ips, nil
}

// Run starts the informers and blocks until ctx ends.
func (v *View) Run(ctx context.Context) error {
	v.factory.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), v.podInf.HasSynced, v.nsInf.HasSynced) {
		v.synced.Store(true)
		close(v.syncCh)
		v.changed.Notify()
	}
	<-ctx.Done()
	v.factory.Shutdown()
	return nil
}

// Synced reports whether the informers have synced.
func (v *View) Synced() bool { return v.synced.Load() }

// SyncedC is closed once the informers have synced.
func (v *View) SyncedC() <-chan struct{} { return v.syncCh }

// PodsByAddr returns every unfinished pod holding addr. More than one means
// an IP is being reused (a terminating pod still holds it).
func (v *View) PodsByAddr(a netip.Addr) ([]*corev1.Pod, error) {
	if !v.Synced() {
		return nil, ErrNotSynced
	}
	objs, err := v.podInf.GetIndexer().ByIndex(byIP, a.Unmap().String())
	if err != nil {
		return nil, fmt.Errorf("pods by address %s: %w", a, err)
	}
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		if p, ok := o.(*corev1.Pod); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// PodByAddr returns the pod that holds addr now: of the unfinished pods
// with that IP, the one that is not terminating. nil when none holds it or
// when the holder is ambiguous (two live pods with one IP: trust neither).
func (v *View) PodByAddr(a netip.Addr) (*corev1.Pod, error) {
	pods, err := v.PodsByAddr(a)
	if err != nil {
		return nil, err
	}
	return Holder(pods), nil
}

// Holder picks the pod that holds an IP from the unfinished pods listed
// with it: the only one, or the only one not being deleted. nil when there
// is none or it is ambiguous.
func Holder(pods []*corev1.Pod) *corev1.Pod {
	var live, terminating []*corev1.Pod
	for _, p := range pods {
		if p.Status.Phase != corev1.PodRunning && p.Status.Phase != corev1.PodPending {
			continue
		}
		if p.DeletionTimestamp != nil {
			terminating = append(terminating, p)
		} else {
			live = append(live, p)
		}
	}
	switch {
	case len(live) == 1:
		return live[0]
	case len(live) == 0 && len(terminating) == 1:
		return terminating[0]
	}
	return nil
}

// Namespace returns the namespace; an error wrapping the lister's NotFound
// when it does not exist (yet), ErrNotSynced before sync.
func (v *View) Namespace(name string) (*corev1.Namespace, error) {
	if !v.Synced() {
		return nil, ErrNotSynced
	}
	ns, err := v.nsList.Get(name)
	if err != nil {
		return nil, fmt.Errorf("namespace %q: %w", name, err)
	}
	return ns, nil
}

// ServiceAccount is the pod's ServiceAccount name ("default" if unset).
func ServiceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

// Gate reports whether every part of the agent's view has synced, and lets
// callers wait for it with a bound.
type Gate struct {
	Parts []func() bool
}

// Synced reports whether all parts have synced.
func (g Gate) Synced() bool {
	for _, p := range g.Parts {
		if !p() {
			return false
		}
	}
	return true
}

// Wait polls until all parts have synced or ctx ends; it reports whether
// they did.
func (g Gate) Wait(ctx context.Context) bool {
	if g.Synced() {
		return true
	}
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return g.Synced()
		case <-t.C:
			if g.Synced() {
				return true
			}
		}
	}
}
