package pods

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/tun"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/podnet"
	"github.com/tunmesh/tunmesh/node/policy"
)

// Stack is the part of the netstack the handler uses.
type Stack interface {
	AttachTUN(cfg netstack.NICConfig) (netstack.NICID, error)
	DetachNIC(id netstack.NICID) error
}

// Certs is the part of the certificate manager the handler uses: one
// Acquire per attached pod, one Release when it goes. The manager counts
// uses, so an identity's certificate is released with its last local pod.
type Certs interface {
	Acquire(id spiffe.ID)
	Release(id spiffe.ID)
}

// PodNet sets up and tears down a pod's tm0 (podnet in production; a fake
// in tests, which need no root).
type PodNet interface {
	Setup(netns string, cfg podnet.Config) (fd int, err error)
	Teardown(netns string, cfg podnet.Config) error
	Check(netns string, cfg podnet.Config) error
	Reopen(netns, name string) (fd int, err error)
}

// RealPodNet is PodNet on the kernel.
type RealPodNet struct{}

func (RealPodNet) Setup(ns string, cfg podnet.Config) (int, error) { return podnet.Setup(ns, cfg) }
func (RealPodNet) Teardown(ns string, cfg podnet.Config) error     { return podnet.Teardown(ns, cfg) }
func (RealPodNet) Check(ns string, cfg podnet.Config) error        { return podnet.Check(ns, cfg) }
func (RealPodNet) Reopen(ns, name string) (int, error)             { return tun.OpenInNetns(ns, name) }

// Config is the node-wide part of the handler's work.
type Config struct {
	TrustDomain string
	TUNMTU      int
	Cluster     []netip.Prefix
	Policy      policy.Config
	StateDir    string
	// Synced, when not nil, gates ADD: until it reports true, ADD answers
	// "try again later" (the agent cannot yet tell which peers are
	// meshed, so it must not take pods whose traffic it would claim).
	Synced func() bool
}

// Handler serves the CNI plugin (it implements cniapi.Agent) and re-attaches
// pods after an agent restart. Calls for one container ID are serialized: a
// runtime retry that overlaps a slow ADD waits for it instead of tearing
// down the first ADD's tm0.
type Handler struct {
	cfg      Config
	client   kubernetes.Interface
	reg      *Registry
	store    Store
	stack    Stack
	certs    Certs
	net      PodNet
	metrics  *nodemetrics.Metrics
	recorder record.EventRecorder
	log      *slog.Logger
	view     View

	locks keyedMutex
}

// View is the cluster view the handler reconciles local pods against.
type View interface {
	PodByAddr(netip.Addr) (*corev1.Pod, error)
	Namespace(name string) (*corev1.Namespace, error)
}

// Deps are the handler's collaborators.
type Deps struct {
	// View, when set, lets Reconcile follow annotation changes of local
	// pods (nil: the policy stays as decided at ADD).
	View     View
	Client   kubernetes.Interface
	Registry *Registry
	Stack    Stack
	Certs    Certs
	PodNet   PodNet // nil means RealPodNet
	Metrics  *nodemetrics.Metrics
	Recorder record.EventRecorder // nil: no events
	Log      *slog.Logger
}

// NewHandler checks its dependencies.
func NewHandler(cfg Config, d Deps) (*Handler, error) {
	if d.Client == nil || d.Registry == nil || d.Stack == nil || d.Certs == nil || d.Metrics == nil || d.Log == nil {
		return nil, errors.New("pods handler: nil dependency")
	}
	if cfg.StateDir == "" || cfg.TUNMTU == 0 || len(cfg.Cluster) == 0 {
		return nil, errors.New("pods handler: state dir, tun mtu and cluster CIDRs are required")
	}
	if d.PodNet == nil {
		d.PodNet = RealPodNet{}
	}
	if d.Recorder == nil {
		d.Recorder = &record.FakeRecorder{}
	}
	return &Handler{
		cfg: cfg, client: d.Client, reg: d.Registry, store: Store{Dir: cfg.StateDir}, stack: d.Stack,
		certs: d.Certs, net: d.PodNet, metrics: d.Metrics, recorder: d.Recorder, log: d.Log, view: d.View,
		locks: keyedMutex{m: map[string]*keyedEntry{}},
	}, nil
}

func (h *Handler) podnetConfig(gateways []netip.Addr) podnet.Config {
	return podnet.Config{TUN: "tm0", MTU: h.cfg.TUNMTU, Cluster: h.cfg.Cluster, Bypass: gateways}
}

func (h *Handler) identity(ns, sa string) spiffe.ID {
	return spiffe.ID{TrustDomain: h.cfg.TrustDomain, Namespace: ns, ServiceAccount: sa}
}

// policyFor reads the pod's namespace and computes its policy. A namespace
// that does not exist yet counts as having no annotations; any other
// failure is returned (the caller answers "try again"), because deciding
// without the namespace would silently drop its opt-outs and skips.
func (h *Handler) policyFor(ctx context.Context, pod *corev1.Pod) (policy.Policy, []error, error) {
	ns, err := h.client.CoreV1().Namespaces().Get(ctx, pod.Namespace, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		ns = nil
	case err != nil:
		return policy.Policy{}, nil, fmt.Errorf("get namespace %q: %w", pod.Namespace, err)
	}
	pol, perrs := h.cfg.Policy.For(pod, ns)
	return pol, perrs, nil
}

// Add decides on the pod and, when meshed, sets up tm0, routes and the
// NIC, and asks for the pod's certificate.
func (h *Handler) Add(ctx context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error) {
	if err := CheckContainerID(req.ContainerID); err != nil {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeGeneric, "%v", err)
	}
	unlock, err := h.locks.lock(ctx, req.ContainerID)
	if err != nil {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeTryAgainLater, "pod %s/%s: another operation on container %s is still running: %v", req.PodNamespace, req.PodName, req.ContainerID, err)
	}
	defer unlock()
	if p := h.reg.ByContainer(req.ContainerID); p != nil { // a repeated ADD
		return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: p.Netns}}, nil
	}
	if h.cfg.Synced != nil && !h.cfg.Synced() {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeTryAgainLater, "pod %s/%s: agent is starting (cluster view not synced yet)", req.PodNamespace, req.PodName)
	}
	pod, err := h.client.CoreV1().Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
	if err != nil {
		code := cniapi.CodeTryAgainLater
		if apierrors.IsNotFound(err) {
			code = cniapi.CodeGeneric
		}
		return cniapi.AddResponse{}, cniapi.Errorf(code, "get pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	pol, perrs, err := h.policyFor(ctx, pod)
	if err != nil {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeTryAgainLater, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	for _, e := range perrs {
		h.recorder.Eventf(pod, corev1.EventTypeWarning, "InvalidMeshAnnotation", "%v", e)
		h.log.Warn("invalid mesh annotation", "pod", pod.Name, "pod_namespace", pod.Namespace, "err", e)
	}
	if !pol.Meshed {
		h.log.Info("pod not meshed", "pod", pod.Name, "pod_namespace", pod.Namespace, "reason", pol.Reason)
		return cniapi.AddResponse{Meshed: false, Reason: pol.Reason}, nil
	}
	var addrs []netip.Addr
	for _, p := range req.IPs {
		addrs = append(addrs, p.Addr().Unmap())
	}
	if len(addrs) == 0 {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s: no IPs from the primary plugin", req.PodNamespace, req.PodName)
	}
	// The node's side of the pod network (the first address of each
	// prefix: the bridge gateway) stays on eth0: probes come from it.
	var gws []netip.Addr
	for _, p := range req.IPs {
		gws = append(gws, p.Masked().Addr().Next())
	}
	if err := ctx.Err(); err != nil {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeTryAgainLater, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	fd, err := h.net.Setup(req.Netns, h.podnetConfig(gws))
	if err != nil {
		return cniapi.AddResponse{}, fmt.Errorf("set up pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	nic, err := h.stack.AttachTUN(netstack.NICConfig{FD: fd, Addrs: addrs, MTU: h.cfg.TUNMTU, Name: req.PodNamespace + "/" + req.PodName})
	if err != nil {
		closeFD(fd)
		_ = h.net.Teardown(req.Netns, h.podnetConfig(gws))
		return cniapi.AddResponse{}, fmt.Errorf("attach pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	p := &Pod{
		ContainerID: req.ContainerID, Namespace: pod.Namespace, Name: pod.Name, Netns: req.Netns,
		Addrs: addrs, NIC: nic, ID: h.identity(pod.Namespace, clusterview.ServiceAccount(pod)), Policy: pol,
	}
	if err := h.store.Save(State{ContainerID: p.ContainerID, Netns: p.Netns, Namespace: p.Namespace, Name: p.Name, Addrs: p.Addrs}); err != nil {
		_ = h.stack.DetachNIC(nic)
		_ = h.net.Teardown(req.Netns, h.podnetConfig(gws))
		return cniapi.AddResponse{}, fmt.Errorf("record pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	h.attached(p)
	h.log.Info("pod meshed", "pod", pod.Name, "pod_namespace", pod.Namespace, "identity", p.ID.String(), "nic", nic)
	return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: req.Netns}}, nil
}

func (h *Handler) attached(p *Pod) {
	h.reg.Add(p)
	h.certs.Acquire(p.ID)
	h.metrics.Pods.Inc()
}

// Del releases the pod: its NIC (and with it the pod's flows), its tm0,
// its state file, and its use of the identity's certificate. Everything
// already gone is fine, and a DEL without a netns (the runtime's second
// DEL after the pod object is deleted) succeeds.
func (h *Handler) Del(ctx context.Context, req cniapi.DelRequest) error {
	if err := CheckContainerID(req.ContainerID); err != nil {
		return cniapi.Errorf(cniapi.CodeGeneric, "%v", err)
	}
	unlock, err := h.locks.lock(ctx, req.ContainerID)
	if err != nil {
		return cniapi.Errorf(cniapi.CodeTryAgainLater, "container %s: another operation is still running: %v", req.ContainerID, err)
	}
	defer unlock()
	p := h.reg.Remove(req.ContainerID)
	if err := h.store.Drop(req.ContainerID); err != nil {
		h.log.Warn("drop pod state", "container_id", req.ContainerID, "err", err)
	}
	if p == nil {
		return nil // never meshed, or already released
	}
	if err := h.stack.DetachNIC(p.NIC); err != nil && !errors.Is(err, netstack.ErrUnknownNIC) {
		h.log.Warn("detach pod", "pod", p.Name, "pod_namespace", p.Namespace, "err", err)
	}
	h.certs.Release(p.ID)
	h.metrics.Pods.Dec()
	netns := req.Netns
	if netns == "" {
		netns = p.Netns
	}
	if err := h.net.Teardown(netns, h.podnetConfig(nil)); err != nil && !isGone(err) {
		h.log.Warn("tear down pod network", "pod", p.Name, "pod_namespace", p.Namespace, "err", err)
	}
	h.log.Info("pod released", "pod", p.Name, "pod_namespace", p.Namespace, "identity", p.ID.String())
	return nil
}

// isGone reports errors meaning the namespace is already gone (the pod's
// sandbox was destroyed before DEL): nothing is left to tear down.
func isGone(err error) bool { return errors.Is(err, os.ErrNotExist) }

// Check reports an error when a pod that should be meshed is not attached.
func (h *Handler) Check(ctx context.Context, req cniapi.CheckRequest) error {
	if p := h.reg.ByContainer(req.ContainerID); p != nil {
		// Compare what the agent recorded with the live namespace.
		if err := h.net.Check(req.Netns, h.podnetConfig(nil)); err != nil {
			return cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
		}
		return nil
	}
	pod, err := h.client.CoreV1().Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
	if err != nil {
		return cniapi.Errorf(cniapi.CodeTryAgainLater, "get pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	pol, _, err := h.policyFor(ctx, pod)
	if err != nil {
		return cniapi.Errorf(cniapi.CodeTryAgainLater, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	if pol.Meshed {
		return cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s should be meshed but is not attached to the agent", req.PodNamespace, req.PodName)
	}
	return nil
}

// Status: ready once the cluster view has synced.
func (h *Handler) Status(context.Context) cniapi.StatusResponse {
	if h.cfg.Synced != nil && !h.cfg.Synced() {
		return cniapi.StatusResponse{Ready: false, Message: "agent informers not synced"}
	}
	return cniapi.StatusResponse{Ready: true}
}

// GC releases pods the runtime no longer knows.
func (h *Handler) GC(ctx context.Context, req cniapi.GCRequest) error {
	valid := map[string]bool{}
	for _, att := range req.ValidAttachments {
		valid[att.ContainerID] = true
	}
	for _, p := range h.reg.All() {
		if valid[p.ContainerID] {
			continue
		}
		if err := h.Del(ctx, cniapi.DelRequest{ContainerID: p.ContainerID}); err != nil {
			return err
		}
	}
	return nil
}

// Restore re-attaches the pods recorded by a previous run of the agent:
// their tm0 is re-opened inside their namespace and attached as a NIC.
// Pods that vanished while the agent was down are cleaned up.
func (h *Handler) Restore(ctx context.Context) {
	states, bad, err := h.store.LoadAll()
	if err != nil {
		h.log.Warn("read pod state", "err", err)
		return
	}
	for file, err := range bad {
		h.log.Warn("unreadable pod state, dropped", "file", file, "err", err)
	}
	for _, st := range states {
		if err := h.reattach(ctx, st); err != nil {
			h.log.Warn("pod not re-attached, cleaned up", "pod", st.Name, "pod_namespace", st.Namespace, "err", err)
			_ = h.net.Teardown(st.Netns, h.podnetConfig(nil))
			_ = h.store.Drop(st.ContainerID)
		}
	}
}

func (h *Handler) reattach(ctx context.Context, st State) error {
	if _, err := os.Stat(st.Netns); err != nil {
		return fmt.Errorf("netns gone: %w", err)
	}
	pod, err := h.client.CoreV1().Pods(st.Namespace).Get(ctx, st.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("pod %s/%s is gone", st.Namespace, st.Name)
	}
	if err != nil {
		return fmt.Errorf("get pod: %w", err)
	}
	pol, _, err := h.policyFor(ctx, pod)
	if err != nil {
		return err
	}
	fd, err := h.net.Reopen(st.Netns, "tm0")
	if err != nil {
		return fmt.Errorf("re-open tm0: %w", err)
	}
	nic, err := h.stack.AttachTUN(netstack.NICConfig{FD: fd, Addrs: st.Addrs, MTU: h.cfg.TUNMTU, Name: st.Namespace + "/" + st.Name})
	if err != nil {
		closeFD(fd)
		return fmt.Errorf("attach: %w", err)
	}
	p := &Pod{ContainerID: st.ContainerID, Namespace: st.Namespace, Name: st.Name, Netns: st.Netns,
		Addrs: st.Addrs, NIC: nic, ID: h.identity(st.Namespace, clusterview.ServiceAccount(pod)), Policy: pol}
	h.attached(p)
	h.log.Info("pod re-attached", "pod", st.Name, "pod_namespace", st.Namespace, "nic", nic)
	return nil
}

// Reconcile keeps every local pod's mesh policy equal to what its Pod and
// Namespace objects say now, every interval until ctx ends. The objects are
// the one source of truth that both sides of a connection read: a client's
// agent decides from the destination's live annotations, so the
// destination's own agent must not keep a copy fixed at ADD. A changed skip
// list takes effect at once; a pod whose policy turns unmeshed is released
// from the mesh (tm0 and its routes removed, so its traffic takes eth0 as
// clients now expect). A pod turned meshed again needs a re-creation (CNI
// ADD): until then clients' tunnels to it are refused, never sent in clear.
func (h *Handler) Reconcile(ctx context.Context, interval time.Duration) error {
	if h.view == nil {
		return nil
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		h.reconcileOnce(ctx)
	}
}

func (h *Handler) reconcileOnce(ctx context.Context) {
	for _, p := range h.reg.All() {
		pod, err := h.view.PodByAddr(p.Addrs[0])
		if err != nil || pod == nil || pod.Namespace != p.Namespace || pod.Name != p.Name {
			continue // not in the view (yet, or any more): DEL handles the end
		}
		ns, err := h.view.Namespace(pod.Namespace)
		if err != nil && !apierrors.IsNotFound(err) {
			continue // decide later rather than drop the namespace's settings
		}
		if err != nil {
			ns = nil
		}
		pol, _ := h.cfg.Policy.For(pod, ns)
		if pol.Meshed == p.Policy.Meshed && pol.SkipInbound.Equal(p.Policy.SkipInbound) && pol.SkipOutbound.Equal(p.Policy.SkipOutbound) {
			continue
		}
		if !pol.Meshed {
			h.recorder.Eventf(pod, corev1.EventTypeWarning, "MeshDisabled", "mesh disabled by annotation (%s): pod released from the mesh", pol.Reason)
			h.log.Warn("pod released from the mesh: its annotations opt it out now", "pod", p.Name, "pod_namespace", p.Namespace, "reason", pol.Reason)
			if err := h.Del(ctx, cniapi.DelRequest{ContainerID: p.ContainerID, Netns: p.Netns}); err != nil {
				h.log.Warn("release pod from the mesh", "pod", p.Name, "pod_namespace", p.Namespace, "err", err)
			}
			continue
		}
		np := *p
		np.Policy = pol
		unlock, err := h.locks.lock(ctx, p.ContainerID)
		if err != nil {
			return
		}
		if h.reg.ByContainer(p.ContainerID) == p { // not removed or replaced meanwhile
			h.reg.Add(&np)
			h.log.Info("pod mesh policy updated", "pod", p.Name, "pod_namespace", p.Namespace,
				"skip_inbound", pol.SkipInbound.String(), "skip_outbound", pol.SkipOutbound.String())
		}
		unlock()
	}
}

// ReleaseFromMesh releases every pod of the node from the mesh for good,
// when tunmesh is being uninstalled: each pod's NIC is detached, its tm0
// and tunmesh's policy routing rules removed from its namespace (so its
// traffic takes the primary CNI's path again, without a restart), and its
// state file dropped; state files of pods not attached (a re-attach that
// failed) are cleaned up too. It returns how many pods it released, and
// every teardown that failed (those pods may be left routing into a tm0
// that nothing serves; the error names them).
func (h *Handler) ReleaseFromMesh(ctx context.Context) (int, error) {
	var errs []error
	released := 0
	for _, p := range h.reg.All() {
		unlock, err := h.locks.lock(ctx, p.ContainerID)
		if err != nil {
			errs = append(errs, fmt.Errorf("release pod %s: %w", p.FullName(), err))
			continue
		}
		if h.reg.Remove(p.ContainerID) == p {
			if err := h.stack.DetachNIC(p.NIC); err != nil && !errors.Is(err, netstack.ErrUnknownNIC) {
				h.log.Warn("detach pod", "pod", p.Name, "pod_namespace", p.Namespace, "err", err)
			}
			h.certs.Release(p.ID)
			h.metrics.Pods.Dec()
			if err := h.net.Teardown(p.Netns, h.podnetConfig(nil)); err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("release pod %s: tear down %s: %w", p.FullName(), p.Netns, err))
			} else {
				released++
				h.log.Info("pod released from the mesh (uninstall)", "pod", p.Name, "pod_namespace", p.Namespace)
			}
			if err := h.store.Drop(p.ContainerID); err != nil {
				errs = append(errs, err)
			}
		}
		unlock()
	}
	states, _, err := h.store.LoadAll()
	if err != nil {
		errs = append(errs, err)
	}
	for _, st := range states {
		if err := h.net.Teardown(st.Netns, h.podnetConfig(nil)); err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("release pod %s/%s: tear down %s: %w", st.Namespace, st.Name, st.Netns, err))
		}
		if err := h.store.Drop(st.ContainerID); err != nil {
			errs = append(errs, err)
		}
	}
	return released, errors.Join(errs...)
}

// ReleaseAll detaches every pod from the agent's state when the agent
// stops. The TUNs and state files stay so a restarted agent re-attaches.
func (h *Handler) ReleaseAll() {
	for _, p := range h.reg.All() {
		if h.reg.Remove(p.ContainerID) != nil {
			h.certs.Release(p.ID)
			h.metrics.Pods.Dec()
		}
	}
}

// keyedMutex serializes operations per key; entries are freed when unused.
type keyedMutex struct {
	mu sync.Mutex // guards m
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	ch    chan struct{} // a token: holding it is holding the lock
	users int
}

// lock takes the key's lock, or fails when ctx ends first.
func (k *keyedMutex) lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{ch: make(chan struct{}, 1)}
		k.m[key] = e
	}
	e.users++
	k.mu.Unlock()
	release := func() {
		k.mu.Lock()
		e.users--
		if e.users == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}
