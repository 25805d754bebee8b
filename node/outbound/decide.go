// Package outbound decides, for each new TCP flow from a local pod, whether
// the mesh carries it (who decides), and serves the flows it carries by
// handing them to the dialer. The decision is a pure function of its inputs
// (the local pod, the cluster view, the service endpoints, the policy) so
// that every branch is table-tested without a cluster or root.
package outbound

import (
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
)

func (v Verdict) String() string {
	switch v {
	case Pass:
		return "pass"
	case Mesh:
		return "mesh"
	}
	return "verdict(?)"
}

// Why a flow is not meshed (connection accounting, metrics).
const (
	ReasonNotMeshed   = "not_meshed"
	ReasonSkippedPort = "skipped_port"
	ReasonNoEndpoints = "no_endpoints"
	ReasonUnknownSrc  = "unknown_source"
)

// Target is where a meshed flow goes.
type Target struct {
	Src      *pods.Pod
	Dst      netip.AddrPort // pod address after service resolution
	DstID    spiffe.ID
	DstNode  netip.Addr // the node agent to dial
	Endpoint *resolve.Endpoint
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
	Resolve(dst netip.AddrPort) (ep resolve.Endpoint, isService bool, err error)
}

// Decider makes the outbound decision. Every field is required.
type Decider struct {
	Local       LocalPods
	Cluster     Cluster
	Services    Services
	Policy      policy.Config
	TrustDomain string
}

func pass(reason string) Decision { return Decision{Verdict: Pass, Reason: reason} }

// Decide meshes the flow when the destination (a pod, or a ClusterIP
// resolved to a ready endpoint) is a meshed pod and neither the source's
// skip-outbound nor the destination's skip-inbound names the port.
func (d *Decider) Decide(f netstack.Flow) Decision {
	src := d.Local.ByNIC(f.NIC)
	if src == nil {
		return pass(ReasonUnknownSrc)
	}
	t := Target{Src: src, Dst: f.Dst}
	if ep, isSvc, err := d.Services.Resolve(f.Dst); isSvc {
		if err != nil {
			return pass(ReasonNoEndpoints)
		}
		t.Dst, t.Endpoint = ep.Addr, &ep
	}
	dst, _ := d.Cluster.PodByAddr(t.Dst.Addr())
	if dst == nil || dst.Spec.HostNetwork || dst.Status.HostIP == "" {
		return pass(ReasonNotMeshed)
	}
	ns, _ := d.Cluster.Namespace(dst.Namespace)
	dpol, _ := d.Policy.For(dst, ns)
	if !dpol.Meshed {
		return pass(ReasonNotMeshed)
	}
	if src.Policy.SkipsOutbound(f.Dst.Port()) || dpol.SkipsInbound(t.Dst.Port()) {
		return pass(ReasonSkippedPort)
	}
	node, err := netip.ParseAddr(dst.Status.HostIP)
	if err != nil {
		return pass(ReasonNotMeshed)
	}
	t.DstID = spiffe.ID{TrustDomain: d.TrustDomain, Namespace: dst.Namespace, ServiceAccount: clusterview.ServiceAccount(dst)}
	t.DstNode = node
	return Decision{Verdict: Mesh, Target: t}
}
