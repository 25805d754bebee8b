// Package outbound decides, for each new TCP flow from a local pod, whether
// the mesh carries it (who decides), and serves the flows it carries by
// handing them to the dialer. The decision is a pure function of its inputs
// (the local pod, the cluster view, the service endpoints, the policy) so
// that every branch is table-tested without a cluster or root.
//
// The rule that shapes it (design principle 6): a flow the mesh claims is
// never let through in plaintext. When the agent cannot tell (not synced,
// a lookup failed) it holds the flow; when the mesh cannot carry a flow it
// claims it refuses it.
package outbound

import (
	"errors"
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/resolve"
)

// Verdict is what happens to a flow.
type Verdict int

const (
	// Pass leaves the flow to the kernel (the mesh does not claim it).
	Pass Verdict = iota
	// Mesh terminates the flow and carries it over mTLS.
	Mesh
	// Hold drops the SYN unanswered: the pod retransmits and the flow is
	// decided again (the agent does not know enough yet).
	Hold
	// Refuse answers the SYN with a reset: the mesh claims the flow but
	// cannot carry it.
	Refuse
	// Deny drops the SYN: NetworkPolicy or authorization refuses the flow
	// (Access). The pod's connect times out, as behind a CNI that drops
	// (docs/policy.md); Access has counted and logged it.
	Deny
)

func (v Verdict) String() string {
	switch v {
	case Pass:
		return "pass"
	case Mesh:
		return "mesh"
	case Hold:
		return "hold"
	case Refuse:
		return "refuse"
	case Deny:
		return "deny"
	}
	return "verdict(?)"
}

// Why a flow is not meshed (connection accounting, metrics).
const (
	ReasonNotMeshed     = "not_meshed"
	ReasonSkippedPort   = "skipped_port"
	ReasonNoEndpoints   = "no_endpoints"
	ReasonUnknownSrc    = "unknown_source"
	ReasonNotSynced     = "not_synced"
	ReasonLookupFailed  = "lookup_failed"
	ReasonNoCertificate = "no_certificate"
	ReasonClaimed       = "claimed_segment"
	ReasonPodConnLimit  = "pod_connection_limit"
	ReasonPolicyDenied  = "policy_denied"
)

// Target is where a meshed flow goes.
type Target struct {
	Src      *pods.Pod
	Dst      netip.AddrPort // pod address after service resolution
	DstID    spiffe.ID
	DstNode  netip.Addr // the node agent to dial
	Endpoint *resolve.Endpoint
	DstPod   *corev1.Pod // the destination pod, as the cluster view has it
}

// Decision is the verdict on one flow, why, and (for Mesh) where to.
type Decision struct {
	Verdict Verdict
	Reason  string
	Target  Target
}

// LocalPods finds the local pod behind a NIC.
type LocalPods interface {
	ByNIC(netstack.NICID) *pods.Pod
}

// Cluster is the cluster view the decision reads.
type Cluster interface {
	PodByAddr(netip.Addr) (*corev1.Pod, error)
	Namespace(name string) (*corev1.Namespace, error)
}

// Services resolves ClusterIPs.
type Services interface {
	Candidates(dst netip.AddrPort) (eps []resolve.Endpoint, isService bool, err error)
	Pick(eps []resolve.Endpoint) resolve.Endpoint
}

// Access applies NetworkPolicy and authorization (node/authz, wired by the
// agent) to flows the mesh would carry, and to plaintext clients of a
// local meshed pod. An error means the agent cannot tell: the flow is held.
type Access interface {
	// Outbound judges the meshed flow f from the verified local pod src
	// (the NIC it came from) to the meshed pod dstPod at dst: src's
	// egress rules and dstPod's inbound rules, so that a flow the
	// destination would refuse is dropped before the pod's connect is
	// accepted. It does not report: a ClusterIP's candidates are judged
	// one by one and only a flow with none allowed is denied.
	Outbound(f netstack.Flow, src *pods.Pod, dst netip.AddrPort, dstPod *corev1.Pod) (allowed bool, err error)
	// Denied counts and logs (once per connection) that Outbound refused
	// the flow f to dst.
	Denied(f netstack.Flow, src *pods.Pod, dst netip.AddrPort, dstPod *corev1.Pod)
	// Plaintext judges a plaintext client at f.Dst of the local meshed
	// pod src's port f.Src.Port(), seen on src's SYN-ACK (the client's SYN
	// reached the pod around the mesh). skipped: the port is one of src's
	// skip-inbound ports (only NetworkPolicy applies there). It counts and
	// logs a denial once per connection.
	Plaintext(f netstack.Flow, src *pods.Pod, skipped bool) (allowed bool, err error)
	// Egress judges, by src's NetworkPolicy egress rules, the plaintext
	// flow f from the verified local pod src to dst (for a ClusterIP,
	// one of its endpoints). Passed through packets reach the host from
	// the agent's host TUN, so a CNI enforcing egress on the pod's veth
	// never sees them: without this, installing the mesh would widen
	// egress. It counts and logs a denial once per connection.
	Egress(f netstack.Flow, src *pods.Pod, dst netip.AddrPort) (allowed bool, err error)
}

// Decider makes the outbound decision. Every field is required but
// Access, which the agent always sets (nil enforces no policy: for tests
// of other parts).
type Decider struct {
	Local       LocalPods
	Cluster     Cluster
	Services    Services
	Synced      func() bool
	Policy      policy.Config
	TrustDomain string
	Access      Access
}

func decision(v Verdict, reason string) Decision { return Decision{Verdict: v, Reason: reason} }

// Decide meshes a flow whose destination is a meshed pod (directly, or a
// ClusterIP with a meshed endpoint) unless the source's skip-outbound or
// the destination's skip-inbound names the port.
//
// ClusterIPs: the agent's choice is final. A flow the agent passes to the
// kernel is balanced by kube-proxy over ALL endpoints, meshed ones
// included, which would reach a meshed pod in plaintext. So when any
// candidate endpoint is meshed (and its port not skipped) the flow goes to
// a meshed one; it is passed through only when no candidate is meshed, and
// refused when there is none at all (kube-proxy would reject it too).
func (d *Decider) Decide(f netstack.Flow) Decision {
	src := d.Local.ByNIC(f.NIC)
	if src == nil {
		// A NIC of the stack is a meshed pod being attached or detached:
		// its traffic is claimed, and nothing is known to carry it.
		return decision(Hold, ReasonUnknownSrc)
	}
	if !d.Synced() {
		return decision(Hold, ReasonNotSynced)
	}
	eps, isSvc, err := d.Services.Candidates(f.Dst)
	if isSvc {
		if err != nil {
			return decision(Refuse, ReasonNoEndpoints)
		}
		if src.Policy.SkipsOutbound(f.Dst.Port()) {
			return d.pass(f, src, ReasonSkippedPort, eps)
		}
		var meshed []resolve.Endpoint
		targets := map[netip.AddrPort]Target{}
		skipped := false
		for _, ep := range eps {
			t, c, err := d.classify(ep.Addr)
			if err != nil {
				return decision(Hold, ReasonLookupFailed)
			}
			switch c {
			case classMeshed:
				meshed = append(meshed, ep)
				targets[ep.Addr] = t
			case classSkipped:
				skipped = true
			}
		}
		if len(meshed) == 0 {
			if skipped {
				return d.pass(f, src, ReasonSkippedPort, eps)
			}
			return d.pass(f, src, ReasonNotMeshed, eps)
		}
		if d.Access != nil {
			// Only endpoints the policies allow are candidates; none
			// allowed is a denial (never a fallback to plaintext).
			allowed := meshed[:0:0]
			for _, ep := range meshed {
				t := targets[ep.Addr]
				ok, err := d.Access.Outbound(f, src, ep.Addr, t.DstPod)
				if err != nil {
					return decision(Hold, ReasonLookupFailed)
				}
				if ok {
					allowed = append(allowed, ep)
				}
			}
			if len(allowed) == 0 {
				d.Access.Denied(f, src, meshed[0].Addr, targets[meshed[0].Addr].DstPod)
				return decision(Deny, ReasonPolicyDenied)
			}
			meshed = allowed
		}
		ep := d.Services.Pick(meshed)
		t := targets[ep.Addr]
		t.Src, t.Endpoint = src, &ep
		return Decision{Verdict: Mesh, Target: t}
	}
	t, c, err := d.classify(f.Dst)
	switch {
	case err != nil:
		return decision(Hold, ReasonLookupFailed)
	case c == classNotMeshed:
		return d.passTo(f, src, ReasonNotMeshed, f.Dst)
	case c == classSkipped || src.Policy.SkipsOutbound(f.Dst.Port()):
		return d.passTo(f, src, ReasonSkippedPort, f.Dst)
	}
	if d.Access != nil {
		ok, err := d.Access.Outbound(f, src, t.Dst, t.DstPod)
		if err != nil {
			return decision(Hold, ReasonLookupFailed)
		}
		if !ok {
			d.Access.Denied(f, src, t.Dst, t.DstPod)
			return decision(Deny, ReasonPolicyDenied)
		}
	}
	t.Src = src
	return Decision{Verdict: Mesh, Target: t}
}

// pass is Decide's Pass of a ClusterIP flow after src's egress
// NetworkPolicy: kube-proxy, not the agent, picks the endpoint, so the
// flow passes only when src may reach every candidate (fail closed: the
// mesh never widens egress; a policy that admits only some endpoints of a
// Service denies the Service, where a CNI would let some connections
// through).
func (d *Decider) pass(f netstack.Flow, src *pods.Pod, reason string, eps []resolve.Endpoint) Decision {
	for _, ep := range eps {
		if v := d.passTo(f, src, reason, ep.Addr); v.Verdict != Pass {
			return v
		}
	}
	return decision(Pass, reason)
}

// passTo is Decide's Pass of a flow to dst after src's egress
// NetworkPolicy (Access.Egress): a denied flow is dropped like a meshed
// one (Deny), a failed lookup held.
func (d *Decider) passTo(f netstack.Flow, src *pods.Pod, reason string, dst netip.AddrPort) Decision {
	if d.Access == nil {
		return decision(Pass, reason)
	}
	ok, err := d.Access.Egress(f, src, dst)
	return passIfAllowed(ok, err, reason)
}

// passIfAllowed turns Access's answer on a flow the mesh leaves in
// plaintext into its decision: a failed lookup holds, a denial drops
// (Deny), an allowed flow passes for reason.
func passIfAllowed(ok bool, err error, reason string) Decision {
	switch {
	case err != nil:
		return decision(Hold, ReasonLookupFailed)
	case !ok:
		return decision(Deny, ReasonPolicyDenied)
	}
	return decision(Pass, reason)
}

// DecideSegment judges a TCP segment from a local pod that belongs to no
// flow the stack knows (after an agent restart, the pods' retransmissions
// of connections the old agent carried; or a meshed pod's answer to a
// plaintext SYN that reached it around the mesh). It answers Pass or Hold
// (drop). The segment's direction is unknown: f.Src may be the client or
// the server. A ClusterIP destination is claimed as for a SYN; between two
// pods the segment is dropped only when the connection would be claimed
// whichever side opened it, so that skipped ports keep working.
func (d *Decider) DecideSegment(f netstack.Flow) Decision {
	src := d.Local.ByNIC(f.NIC)
	if src == nil {
		return decision(Hold, ReasonUnknownSrc)
	}
	if !d.Synced() {
		return decision(Hold, ReasonNotSynced)
	}
	eps, isSvc, err := d.Services.Candidates(f.Dst)
	if isSvc {
		if f.SYNACK {
			// No client connects from a ClusterIP (kube-proxy translates
			// it on the client's side): a SYN-ACK to one is never
			// legitimate, and it would dodge the plaintext check below
			// (review finding 8).
			return decision(Hold, ReasonClaimed)
		}
		if err != nil || src.Policy.SkipsOutbound(f.Dst.Port()) {
			return decision(Pass, ReasonNotMeshed)
		}
		for _, ep := range eps {
			_, c, err := d.classify(ep.Addr)
			if err != nil {
				return decision(Hold, ReasonLookupFailed)
			}
			if c == classMeshed {
				return decision(Hold, ReasonClaimed)
			}
		}
		return decision(Pass, ReasonNotMeshed)
	}
	// src as the client of f.Dst.
	_, c, err := d.classify(f.Dst)
	if err != nil {
		return decision(Hold, ReasonLookupFailed)
	}
	if c != classMeshed || src.Policy.SkipsOutbound(f.Dst.Port()) {
		return d.plaintext(f, src, ReasonNotMeshed)
	}
	// src as the server of a client at f.Dst: the peer is a meshed pod
	// (classify said so); the peer's skip-outbound and src's skip-inbound
	// of src's port decide.
	if src.Policy.SkipsInbound(f.Src.Port()) {
		return d.plaintext(f, src, ReasonSkippedPort)
	}
	peer, err := d.Cluster.PodByAddr(f.Dst.Addr())
	if err != nil || peer == nil {
		return decision(Hold, ReasonLookupFailed)
	}
	ppol, err := d.policy(peer)
	if err != nil {
		return decision(Hold, ReasonLookupFailed)
	}
	if ppol.SkipsOutbound(f.Src.Port()) {
		return d.plaintext(f, src, ReasonSkippedPort)
	}
	return decision(Hold, ReasonClaimed)
}

// plaintext is DecideSegment's answer for a segment the mesh does not
// claim. A SYN-ACK there is the local meshed pod answering a plaintext
// client that reached it around the mesh: the pod's inbound policy
// (NetworkPolicy ingress, default inbound policy, Authorizations) is
// applied to it, and dropping the SYN-ACK refuses the connection as a
// CNI's drop would. Other segments (established flows, the pod as a
// client) pass.
func (d *Decider) plaintext(f netstack.Flow, src *pods.Pod, reason string) Decision {
	if !f.SYNACK || d.Access == nil {
		return decision(Pass, reason)
	}
	ok, err := d.Access.Plaintext(f, src, src.Policy.SkipsInbound(f.Src.Port()))
	return passIfAllowed(ok, err, reason)
}

type class int

const (
	classNotMeshed class = iota
	classSkipped         // a meshed pod, but this port is skipped inbound
	classMeshed
)

// classify looks up the pod at dst and tells whether a flow to dst is
// meshed; for a meshed one it fills the target's destination fields.
func (d *Decider) classify(dst netip.AddrPort) (Target, class, error) {
	pod, err := d.Cluster.PodByAddr(dst.Addr())
	if err != nil {
		return Target{}, classNotMeshed, err
	}
	if pod == nil || pod.Spec.HostNetwork || pod.Status.HostIP == "" {
		return Target{}, classNotMeshed, nil
	}
	dpol, err := d.policy(pod)
	if err != nil {
		return Target{}, classNotMeshed, err
	}
	if !dpol.Meshed {
		return Target{}, classNotMeshed, nil
	}
	if dpol.SkipsInbound(dst.Port()) {
		return Target{}, classSkipped, nil
	}
	node, err := netip.ParseAddr(pod.Status.HostIP)
	if err != nil {
		return Target{}, classNotMeshed, errors.New("pod host IP unparsable")
	}
	return Target{
		DstPod:  pod,
		Dst:     dst,
		DstID:   spiffe.ID{TrustDomain: d.TrustDomain, Namespace: pod.Namespace, ServiceAccount: clusterview.ServiceAccount(pod)},
		DstNode: node,
	}, classMeshed, nil
}

// policy is the pod's mesh policy. Any namespace lookup failure, NotFound
// included, is an error (the caller holds the flow): a pod seen before its
// namespace must not lose the namespace's opt-outs, skips and default
// inbound policy (review finding 6); the namespace arrives within moments
// and the pod's retransmission is decided again.
func (d *Decider) policy(pod *corev1.Pod) (policy.Policy, error) {
	ns, err := d.Cluster.Namespace(pod.Namespace)
	if err != nil {
		return policy.Policy{}, err
	}
	if ns == nil {
		return policy.Policy{}, errors.New("namespace " + pod.Namespace + " not in the cluster view")
	}
	pol, _ := d.Policy.For(pod, ns) // annotation errors fall back to defaults, reported at ADD
	return pol, nil
}
