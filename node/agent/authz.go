package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/inbound"
	"github.com/tunmesh/tunmesh/node/outbound"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
)

// enforcer applies NetworkPolicy, default inbound policies and
// Authorizations (node/authz) for the outbound decision (outbound.Access)
// and the inbound checks (inbound.Authorizer), reading pods and namespaces
// from the cluster view and policies from clusterview.Policies. See
// docs/policy.md.
type enforcer struct {
	engine   *authz.Engine
	view     *clusterview.View
	policies *clusterview.Policies
	report   *authz.Reporter
	nodeIP   netip.Addr
	recorder record.EventRecorder
	log      *slog.Logger

	warnedMu sync.Mutex        // guards warned
	warned   map[string]string // pod UID -> the invalid default-inbound-policy value already reported
}

// newEnforcer builds the policy informers and the engine, and adds the
// policies to the agent's synced gate (so nothing is claimed, and no pod
// attached, before they have synced). Called from New before anything
// copies the gate.
func (a *Agent) newEnforcer(pol policy.Config) error {
	if a.cfg.Dynamic == nil {
		return errors.New("agent: nil dynamic client (Authorization informer)")
	}
	rep, err := authz.NewReporter(a.reg, a.log.With("component", "policy"))
	if err != nil {
		return fmt.Errorf("policy metrics: %w", err)
	}
	pv, err := clusterview.NewPolicies(a.client, a.cfg.Dynamic, rep, a.log.With("component", "policy"))
	if err != nil {
		return err
	}
	eng, err := authz.New(a.view, pv, pv, pol, a.cfg.TrustDomain)
	if err != nil {
		return err
	}
	a.enforcer = &enforcer{engine: eng, view: a.view, policies: pv, report: rep, nodeIP: a.cfg.NodeIP,
		recorder: a.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tunmesh-node", Host: a.cfg.NodeName}),
		log:      a.log.With("component", "policy"), warned: map[string]string{}}
	a.gate.Parts = append(a.gate.Parts, pv.Synced)
	return nil
}

var errPodNotInView = errors.New("pod not in the cluster view")

// pod is a local pod's object from the view, by name.
func (e *enforcer) pod(p *pods.Pod) (*corev1.Pod, error) {
	obj, err := e.view.Pod(p.Namespace, p.Name)
	if err != nil {
		return nil, err
	}
	if obj == nil {
		return nil, fmt.Errorf("%s: %w", p.FullName(), errPodNotInView)
	}
	return obj, nil
}

// outbound judges a meshed flow from the local pod src at from (the
// flow's source address: netstack admits only the NIC's own addresses)
// to dst.
func (e *enforcer) outbound(src *pods.Pod, from netip.Addr, dst netip.AddrPort, dstPod *corev1.Pod) (authz.Decision, error) {
	if !e.policies.Synced() {
		return authz.Decision{}, clusterview.ErrNotSynced
	}
	sp, err := e.pod(src)
	if err != nil {
		return authz.Decision{}, err
	}
	d := e.engine.Outbound(sp, from, src.ID, dst, dstPod)
	if d.Kind == authz.KindLookup {
		return d, errors.New(d.Detail)
	}
	return d, nil
}

// Outbound implements outbound.Access.
func (e *enforcer) Outbound(f netstack.Flow, src *pods.Pod, dst netip.AddrPort, dstPod *corev1.Pod) (bool, error) {
	d, err := e.outbound(src, f.Src.Addr(), dst, dstPod)
	return d.Allowed, err
}

// Denied implements outbound.Access.
func (e *enforcer) Denied(f netstack.Flow, src *pods.Pod, dst netip.AddrPort, dstPod *corev1.Pod) {
	d, err := e.outbound(src, f.Src.Addr(), dst, dstPod)
	if err != nil || d.Allowed {
		return // changed meanwhile; the next SYN is judged again
	}
	e.report.Denied(authz.AtSource, f.Src, dst, d, "src_pod", src.FullName(), "client_id", src.ID.String())
}

// Egress implements outbound.Access: src's egress NetworkPolicy for a
// plaintext (passed through) TCP flow to dst.
func (e *enforcer) Egress(f netstack.Flow, src *pods.Pod, dst netip.AddrPort) (bool, error) {
	return e.egress(f.Src, src, dst, "")
}

var _ outbound.DatagramAccess = (*enforcer)(nil)

// EgressDatagram implements outbound.DatagramAccess: src's egress
// NetworkPolicy for a non-TCP flow (UDP, SCTP, ICMP...) to dst.
func (e *enforcer) EgressDatagram(g netstack.Datagram, src *pods.Pod, dst netip.AddrPort, proto corev1.Protocol) (bool, error) {
	return e.egress(g.Src, src, dst, proto)
}

// egress judges src's egress NetworkPolicy for a plaintext flow from
// from to dst over proto ("" is TCP), and reports a denial.
func (e *enforcer) egress(from netip.AddrPort, src *pods.Pod, dst netip.AddrPort, proto corev1.Protocol) (bool, error) {
	if !e.policies.Synced() {
		return false, clusterview.ErrNotSynced
	}
	sp, err := e.pod(src)
	if err != nil {
		return false, err
	}
	dp, err := e.view.PodByAddr(dst.Addr())
	if err != nil {
		return false, fmt.Errorf("egress peer lookup: %w", err)
	}
	d := e.engine.Egress(sp, from.Addr(), dst, dp, proto)
	if !d.Allowed {
		e.report.Denied(authz.AtSource, from, dst, d, "src_pod", src.FullName(), "client_id", src.ID.String())
	}
	return d.Allowed, nil
}

// Plaintext implements outbound.Access: src is the local meshed pod
// answering the plaintext client at f.Dst. The node's own address (the
// kubelet, if the pod's gateway bypass does not already keep its probes
// off tm0) is let through to the pod's declared probe ports only, as
// NetworkPolicy implementations let the node probe: a probe on the
// serving port opens that port to every process of the node (docs/policy.md).
func (e *enforcer) Plaintext(f netstack.Flow, src *pods.Pod, skipped bool) (bool, error) {
	sp, err := e.pod(src)
	if err != nil {
		return false, err
	}
	if f.Dst.Addr() == e.nodeIP && authz.ProbePort(sp, f.Src.Port()) {
		return true, nil // before the policies' sync: probes keep working across an agent restart
	}
	if !e.policies.Synced() {
		return false, clusterview.ErrNotSynced
	}
	var d authz.Decision
	if skipped {
		d = e.engine.PlaintextNetworkPolicy(sp, f.Src.Port(), f.Dst.Addr())
	} else {
		d = e.engine.Plaintext(sp, f.Src.Port(), f.Dst.Addr())
	}
	if d.Kind == authz.KindLookup {
		return false, errors.New(d.Detail)
	}
	if !d.Allowed {
		e.report.Denied(authz.AtPlaintext, f.Dst, f.Src, d, "dst_pod", src.FullName())
		e.warnInvalid(sp, d)
	}
	return d.Allowed, nil
}

// warnInvalid reports, once per pod and value, a default inbound policy
// annotation that could not be used (the pod gets deny): a Warning event
// on the pod and a log line. CNI ADD reports values present at attach
// time; this covers values changed later.
func (e *enforcer) warnInvalid(p *corev1.Pod, d authz.Decision) {
	if d.Kind != authz.KindDefaultInbound {
		return
	}
	di, src, err := e.engine.DefaultInbound(p)
	if err != nil || di != policy.Deny || src != authz.SourceInvalidAnnotation {
		return
	}
	// The pod's values (a namespace's bad value is reported once per pod).
	v := p.Annotations[policy.AnnotationDefaultInboundPolicy] + "\x00" + p.Annotations[policy.LinkerdAnnotationDefaultInboundPolicy]
	e.warnedMu.Lock()
	seen, ok := e.warned[string(p.UID)]
	if ok && seen == v {
		e.warnedMu.Unlock()
		return
	}
	if len(e.warned) > 4096 {
		clear(e.warned) // bounded; at worst a warning repeats
	}
	e.warned[string(p.UID)] = v
	e.warnedMu.Unlock()
	msg := "invalid default-inbound-policy annotation (on the pod or its namespace): inbound connections denied until it is fixed; " +
		`want one of "all-unauthenticated", "cluster-unauthenticated", "all-authenticated", "cluster-authenticated", "deny"`
	e.recorder.Eventf(p, corev1.EventTypeWarning, "InvalidMeshAnnotation", "%s", msg)
	e.log.Warn("invalid default inbound policy: denying", "pod", p.Name, "pod_namespace", p.Namespace)
}

var _ inbound.SyncWaiter = (*enforcer)(nil)

// PoliciesSynced implements inbound.SyncWaiter.
func (e *enforcer) PoliciesSynced() <-chan struct{} { return e.policies.SyncedC() }

// AuthorizeInbound implements inbound.Authorizer.
func (e *enforcer) AuthorizeInbound(r inbound.Request, src *corev1.Pod, dst *pods.Pod) (allowed, known bool, detail string) {
	if !e.policies.Synced() {
		return false, false, "policies not synced"
	}
	dp, err := e.pod(dst)
	if err != nil {
		return false, false, err.Error()
	}
	id := r.ClientID
	d := e.engine.Inbound(authz.Client{IP: r.Header.Src, Pod: src, ID: &id}, dp, r.Header.Dst.Port())
	if d.Kind == authz.KindLookup {
		return false, false, d.Detail
	}
	if !d.Allowed {
		e.report.DeniedStream(netip.AddrPortFrom(r.Header.Src, 0), r.Header.Dst, d, "dst_pod", dst.FullName(), "client_id", id.String())
		e.warnInvalid(dp, d)
	}
	return d.Allowed, true, d.Detail
}
