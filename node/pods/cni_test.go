package pods

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/podnet"
)

type fakeStack struct {
	mu       sync.Mutex
	next     netstack.NICID
	attached map[netstack.NICID]bool
}

func (s *fakeStack) AttachTUN(netstack.NICConfig) (netstack.NICID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.next++
	s.attached[s.next] = true
	return s.next, nil
}

func (s *fakeStack) DetachNIC(id netstack.NICID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.attached[id] {
		return netstack.ErrUnknownNIC
	}
	delete(s.attached, id)
	return nil
}

type fakeCerts struct {
	mu   sync.Mutex
	uses map[spiffe.ID]int
}

func (c *fakeCerts) Acquire(id spiffe.ID) { c.mu.Lock(); c.uses[id]++; c.mu.Unlock() }
func (c *fakeCerts) Release(id spiffe.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.uses[id]--; c.uses[id] <= 0 {
		delete(c.uses, id)
	}
}
func (c *fakeCerts) held(id spiffe.ID) bool { c.mu.Lock(); defer c.mu.Unlock(); return c.uses[id] > 0 }

// fakeNet stands in for podnet; setupDelay makes ADD slow.
type fakeNet struct {
	mu         sync.Mutex
	setupDelay time.Duration
	setups     int
	teardowns  []string
}

func (n *fakeNet) Setup(string, podnet.Config) (int, error) {
	time.Sleep(n.setupDelay)
	n.mu.Lock()
	n.setups++
	n.mu.Unlock()
	return -1, nil
}
func (n *fakeNet) Teardown(ns string, _ podnet.Config) error {
	n.mu.Lock()
	n.teardowns = append(n.teardowns, ns)
	n.mu.Unlock()
	if ns == "" {
		return errors.New("no netns")
	}
	return nil
}
func (n *fakeNet) Check(string, podnet.Config) error  { return nil }
func (n *fakeNet) Reopen(string, string) (int, error) { return -1, nil }

type env struct {
	h     *Handler
	stack *fakeStack
	certs *fakeCerts
	net   *fakeNet
	reg   *Registry
}

func newEnv(t *testing.T, synced func() bool, objs ...*corev1.Pod) *env {
	t.Helper()
	client := fake.NewClientset()
	for _, p := range objs {
		if _, err := client.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	e := &env{stack: &fakeStack{attached: map[netstack.NICID]bool{}}, certs: &fakeCerts{uses: map[spiffe.ID]int{}}, net: &fakeNet{}, reg: NewRegistry()}
	h, err := NewHandler(Config{TrustDomain: "cluster.local", TUNMTU: 65520, Cluster: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		StateDir: t.TempDir(), Synced: synced},
		Deps{Client: client, Registry: e.reg, Stack: e.stack, Certs: e.certs, PodNet: e.net, Metrics: nodemetrics.ForTest(), Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	e.h = h
	return e
}

func jobPod(name, sa string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "batch", Name: name}, Spec: corev1.PodSpec{ServiceAccountName: sa}}
}

func addReq(container, name, ip string) cniapi.AddRequest {
	return cniapi.AddRequest{ContainerID: container, Netns: "/var/run/netns/" + container, IfName: "eth0", PodNamespace: "batch", PodName: name,
		IPs: []netip.Prefix{netip.MustParsePrefix(ip + "/24")}}
}

// TestJobDelTwice (task c): a Job pod's container exits -> DEL with netns;
// the pod object is deleted -> DEL again with an empty netns and nothing
// else. Both succeed; the first releases the NIC, tm0 and state, and the
// identity's certificate only once no other local pod uses it.
func TestJobDelTwice(t *testing.T) {
	e := newEnv(t, nil, jobPod("job-a", "worker"), jobPod("job-b", "worker"))
	ctx := context.Background()
	for _, r := range []cniapi.AddRequest{addReq("ca", "job-a", "10.244.1.2"), addReq("cb", "job-b", "10.244.1.3")} {
		if resp, err := e.h.Add(ctx, r); err != nil || !resp.Meshed {
			t.Fatalf("ADD %s: %+v %v", r.ContainerID, resp, err)
		}
	}
	worker := spiffe.ID{TrustDomain: "cluster.local", Namespace: "batch", ServiceAccount: "worker"}

	if err := e.h.Del(ctx, cniapi.DelRequest{ContainerID: "ca", Netns: "/var/run/netns/ca", IfName: "eth0", PodNamespace: "batch", PodName: "job-a"}); err != nil {
		t.Fatalf("first DEL: %v", err)
	}
	if err := e.h.Del(ctx, cniapi.DelRequest{ContainerID: "ca", IfName: "eth0"}); err != nil {
		t.Fatalf("second DEL (empty netns): %v", err)
	}
	if e.reg.ByContainer("ca") != nil || len(e.stack.attached) != 1 {
		t.Fatalf("pod a still attached (nics %v)", e.stack.attached)
	}
	if !e.certs.held(worker) {
		t.Fatal("certificate released while job-b still uses the identity")
	}
	if err := e.h.Del(ctx, cniapi.DelRequest{ContainerID: "cb", Netns: "/var/run/netns/cb", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	if e.certs.held(worker) {
		t.Fatal("certificate still held after the identity's last pod left")
	}
	if len(e.stack.attached) != 0 {
		t.Fatalf("nics left: %v", e.stack.attached)
	}
	states, _, err := e.h.store.LoadAll()
	if err != nil || len(states) != 0 {
		t.Fatalf("state files left: %v %v", states, err)
	}
}

// TestReleaseFromMesh (issue 12, uninstall): released pods lose tm0 and
// their rules (Teardown in their netns), their NIC, state file and
// certificate use; a stale state file of a pod that was never re-attached
// is cleaned up too. ReleaseAll (a plain restart) by contrast keeps tm0
// and the state files.
func TestReleaseFromMesh(t *testing.T) {
	ctx := context.Background()
	setup := func(t *testing.T) *env {
		e := newEnv(t, nil, jobPod("a", "worker"), jobPod("b", "worker"))
		for _, r := range []cniapi.AddRequest{addReq("ca", "a", "10.244.1.2"), addReq("cb", "b", "10.244.1.3")} {
			if resp, err := e.h.Add(ctx, r); err != nil || !resp.Meshed {
				t.Fatalf("ADD %s: %+v %v", r.ContainerID, resp, err)
			}
		}
		// A pod recorded by an earlier agent and never re-attached.
		if err := e.h.store.Save(State{ContainerID: "cz", Netns: "/var/run/netns/cz", Namespace: "batch", Name: "z"}); err != nil {
			t.Fatal(err)
		}
		return e
	}
	worker := spiffe.ID{TrustDomain: "cluster.local", Namespace: "batch", ServiceAccount: "worker"}

	t.Run("restart keeps tm0 and state", func(t *testing.T) {
		e := setup(t)
		e.h.ReleaseAll()
		if len(e.net.teardowns) != 0 {
			t.Fatalf("restart tore down %v", e.net.teardowns)
		}
		if states, _, _ := e.h.store.LoadAll(); len(states) != 3 {
			t.Fatalf("restart dropped state: %v", states)
		}
	})
	t.Run("uninstall releases every pod", func(t *testing.T) {
		e := setup(t)
		n, err := e.h.ReleaseFromMesh(ctx)
		if err != nil || n != 2 {
			t.Fatalf("ReleaseFromMesh = %d, %v; want 2 released", n, err)
		}
		want := map[string]bool{"/var/run/netns/ca": true, "/var/run/netns/cb": true, "/var/run/netns/cz": true}
		for _, ns := range e.net.teardowns {
			delete(want, ns)
		}
		if len(want) != 0 {
			t.Fatalf("not torn down: %v (tore down %v)", want, e.net.teardowns)
		}
		if e.reg.Len() != 0 || len(e.stack.attached) != 0 || e.certs.held(worker) {
			t.Fatalf("still attached: %d pods, nics %v, certificate held %v", e.reg.Len(), e.stack.attached, e.certs.held(worker))
		}
		if states, _, err := e.h.store.LoadAll(); err != nil || len(states) != 0 {
			t.Fatalf("state files left: %v %v", states, err)
		}
	})
	t.Run("a failed teardown is reported", func(t *testing.T) {
		e := setup(t)
		if err := e.h.store.Save(State{ContainerID: "cbad", Namespace: "batch", Name: "bad"}); err != nil { // no netns: fakeNet fails
			t.Fatal(err)
		}
		if _, err := e.h.ReleaseFromMesh(ctx); err == nil {
			t.Fatal("ReleaseFromMesh hid a failed teardown")
		}
	})
}

// TestAddBeforeSyncTriesAgain (item 1): until the cluster view has synced
// ADD answers "try again later".
func TestAddBeforeSyncTriesAgain(t *testing.T) {
	e := newEnv(t, func() bool { return false }, jobPod("p", "default"))
	_, err := e.h.Add(context.Background(), addReq("c1", "p", "10.244.1.2"))
	var ce *cniapi.Error
	if !errors.As(err, &ce) || ce.Code != cniapi.CodeTryAgainLater {
		t.Fatalf("ADD before sync = %v, want code %d", err, cniapi.CodeTryAgainLater)
	}
	if e.net.setups != 0 {
		t.Fatal("pod network set up before sync")
	}
}

// TestAddSerializedPerContainer (smaller hole): a runtime retry that
// overlaps a slow ADD waits for it and answers from its result, instead of
// setting up (and tearing down) a second tm0.
func TestAddSerializedPerContainer(t *testing.T) {
	e := newEnv(t, nil, jobPod("p", "default"))
	e.net.setupDelay = 200 * time.Millisecond
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.h.Add(context.Background(), addReq("c1", "p", "10.244.1.2"))
		}()
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("ADDs: %v", errs)
	}
	if e.net.setups != 1 || len(e.net.teardowns) != 0 || len(e.stack.attached) != 1 {
		t.Fatalf("setups %d teardowns %v nics %v, want one setup and nothing torn down", e.net.setups, e.net.teardowns, e.stack.attached)
	}
}

// TestBadContainerID: a container ID becomes a file name; one that could
// walk the file system is refused.
func TestBadContainerID(t *testing.T) {
	e := newEnv(t, nil, jobPod("p", "default"))
	for _, id := range []string{"../../etc/passwd", "a/b", ".hidden", ""} {
		if _, err := e.h.Add(context.Background(), addReq(id, "p", "10.244.1.2")); err == nil {
			t.Errorf("ADD with container ID %q accepted", id)
		}
		if err := e.h.Del(context.Background(), cniapi.DelRequest{ContainerID: id}); err == nil {
			t.Errorf("DEL with container ID %q accepted", id)
		}
	}
}

// fakeView serves pods by address for Reconcile.
type fakeView struct {
	mu   sync.Mutex
	pods map[netip.Addr]*corev1.Pod
}

func (v *fakeView) PodByAddr(a netip.Addr) (*corev1.Pod, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.pods[a], nil
}
func (v *fakeView) Namespace(string) (*corev1.Namespace, error) { return nil, nil }

// TestReconcileFollowsAnnotations (item 4): the destination's own agent
// follows the Pod object as the clients' agents do: a new skip list takes
// effect, and a pod annotated out of the mesh is released from it (tm0
// removed, certificate released) instead of staying meshed while clients
// send it plaintext.
func TestReconcileFollowsAnnotations(t *testing.T) {
	p := jobPod("web", "web")
	e := newEnv(t, nil, p)
	view := &fakeView{pods: map[netip.Addr]*corev1.Pod{}}
	e.h.view = view
	ctx := context.Background()
	if _, err := e.h.Add(ctx, addReq("c1", "web", "10.244.1.9")); err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr("10.244.1.9")
	live := p.DeepCopy()
	live.Annotations = map[string]string{"config.tunmesh.io/skip-inbound-ports": "8080"}
	view.pods[addr] = live
	e.h.reconcileOnce(ctx)
	if got := e.reg.ByContainer("c1"); got == nil || !got.Policy.SkipsInbound(8080) {
		t.Fatalf("skip-inbound change not applied: %+v", got)
	}

	live = live.DeepCopy()
	live.Annotations = map[string]string{"tunmesh.io/inject": "disabled"}
	view.pods[addr] = live
	e.h.reconcileOnce(ctx)
	if e.reg.ByContainer("c1") != nil || len(e.stack.attached) != 0 {
		t.Fatal("pod annotated out of the mesh is still attached")
	}
	if len(e.net.teardowns) != 1 || e.net.teardowns[0] != "/var/run/netns/c1" {
		t.Fatalf("teardowns %v, want tm0 removed from the pod", e.net.teardowns)
	}
	if e.certs.held(spiffe.ID{TrustDomain: "cluster.local", Namespace: "batch", ServiceAccount: "web"}) {
		t.Fatal("certificate still held")
	}
}
