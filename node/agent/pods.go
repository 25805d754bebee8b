package agent

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/policy"
)

// clusterPods knows every pod of the cluster by IP (to find a destination
// pod's identity and node, and to check a tunnel client's source) and
// every namespace (for namespace-level annotations).
type clusterPods struct {
	client kubernetes.Interface
	pods   cache.Indexer
	nsList listersv1.NamespaceLister
	ok     atomic.Bool
}

const byIP = "podIP"

func newClusterPods(client kubernetes.Interface) *clusterPods { return &clusterPods{client: client} }

func (c *clusterPods) run(ctx context.Context) error {
	f := informers.NewSharedInformerFactory(c.client, 0)
	inf := f.Core().V1().Pods().Informer()
	if err := inf.AddIndexers(cache.Indexers{byIP: func(obj any) ([]string, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			return nil, nil
		}
		var ips []string
		for _, ip := range p.Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		return ips, nil
	}}); err != nil {
		return err
	}
	c.pods = inf.GetIndexer()
	nsInf := f.Core().V1().Namespaces()
	c.nsList = nsInf.Lister()
	f.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced, nsInf.Informer().HasSynced) {
		c.ok.Store(true)
	}
	<-ctx.Done()
	f.Shutdown()
	return nil
}

func (c *clusterPods) synced() bool { return c.ok.Load() }

// byAddr returns the running pod holding addr.
func (c *clusterPods) byAddr(a netip.Addr) *corev1.Pod {
	if !c.synced() {
		return nil
	}
	objs, err := c.pods.ByIndex(byIP, a.String())
	if err != nil {
		return nil
	}
	for _, o := range objs {
		if p := o.(*corev1.Pod); p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodPending {
			return p
		}
	}
	return nil
}

func (c *clusterPods) namespace(name string) *corev1.Namespace {
	if !c.synced() {
		return nil
	}
	ns, err := c.nsList.Get(name)
	if err != nil {
		return nil
	}
	return ns
}

func serviceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

// localPod is a meshed pod on this node.
type localPod struct {
	containerID string
	namespace   string
	name        string
	netns       string
	addrs       []netip.Addr
	nic         netstack.NICID
	id          spiffe.ID
	policy      policy.Policy
}

// localPods indexes the meshed pods of this node.
type localPods struct {
	mu          sync.RWMutex // guards the maps
	byContainer map[string]*localPod
	byNIC       map[netstack.NICID]*localPod
	byAddr      map[netip.Addr]*localPod
}

func newLocalPods() *localPods {
	return &localPods{byContainer: map[string]*localPod{}, byNIC: map[netstack.NICID]*localPod{}, byAddr: map[netip.Addr]*localPod{}}
}

func (l *localPods) add(p *localPod) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.byContainer[p.containerID] = p
	l.byNIC[p.nic] = p
	for _, a := range p.addrs {
		l.byAddr[a] = p
	}
}

func (l *localPods) remove(containerID string) *localPod {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.byContainer[containerID]
	if p == nil {
		return nil
	}
	delete(l.byContainer, containerID)
	delete(l.byNIC, p.nic)
	for _, a := range p.addrs {
		if l.byAddr[a] == p {
			delete(l.byAddr, a)
		}
	}
	return p
}

func (l *localPods) container(id string) *localPod {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.byContainer[id]
}

func (l *localPods) nic(id netstack.NICID) *localPod {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.byNIC[id]
}

func (l *localPods) addr(a netip.Addr) *localPod {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.byAddr[a]
}

// withIdentity returns a local pod serving identity id, if any.
func (l *localPods) withIdentity(id spiffe.ID) *localPod {
	l.mu.RLock()
	defer l.mu.RUnlock()
	for _, p := range l.byContainer {
		if p.id == id {
			return p
		}
	}
	return nil
}

// closeAll detaches every pod from the stack when the agent stops. The
// TUNs stay (persistent) so a restarted agent can re-attach.
func (l *localPods) closeAll(a *Agent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, p := range l.byContainer {
		a.certs.Release(p.id)
		delete(l.byContainer, id)
	}
	l.byNIC = map[netstack.NICID]*localPod{}
	l.byAddr = map[netip.Addr]*localPod{}
}

func closeFD(fd int) { _ = unix.Close(fd) }
