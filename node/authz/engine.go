package authz

import (
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/netpol"
	"github.com/tunmesh/tunmesh/node/policy"
)

// Cluster reads pods and namespaces (clusterview.View; a static snapshot
// in tunmeshctl). Namespace returns an error (apierrors.IsNotFound for a
// namespace that does not exist); the default inbound policy of a pod
// whose namespace cannot be read is a lookup failure, never a default.
type Cluster interface {
	PodByAddr(netip.Addr) (*corev1.Pod, error)
	Namespace(name string) (*corev1.Namespace, error)
}

// Authorizations gives the compiled Authorizations of a namespace, in a
// stable order (by name).
type Authorizations interface {
	Authorizations(namespace string) []*Authorization
}

// Kinds of the rule that decided (Decision.Kind), metric label values.
const (
	KindNetworkPolicy  = "networkpolicy"
	KindAuthorization  = "authorization"
	KindDefaultInbound = "default_inbound"
	KindLookup         = "lookup"
)

// Reasons (Decision.Reason): stable snake_case, used in logs and metrics.
const (
	ReasonAllowed           = "allowed"
	ReasonNetpolDefaultDeny = "networkpolicy_default_deny"
	ReasonNotAuthorized     = "not_authorized"
	ReasonPlaintextRefused  = "plaintext_refused"
	ReasonDefaultDeny       = "default_inbound_deny"
	ReasonLookupFailed      = "lookup_failed"
)

// Client is the client end of an inbound connection.
type Client struct {
	IP netip.Addr
	// Pod is the client pod (verified for meshed clients: its IP is bound
	// to the certificate and the node), nil for a non-pod address.
	Pod *corev1.Pod
	// ID is the client certificate's identity; nil for plaintext.
	ID *spiffe.ID
}

// Decision is the outcome for one connection.
type Decision struct {
	Allowed bool
	// Direction is "egress" or "ingress": the side whose rules decided.
	Direction string
	// Kind is the kind of rule that decided (Kind*); Policy names it:
	// "namespace/name" of a NetworkPolicy (for a default deny, the first
	// policy that isolates the pod) or Authorization, or for the default
	// inbound policy "namespace/value".
	Kind, Policy string
	Reason       string
	// Detail is one human line; Steps has one line per layer evaluated.
	Detail string
	Steps  []string
}

// PolicyNamespace and PolicyName split Policy for metric labels.
func (d Decision) PolicyNamespace() string { ns, _ := split(d.Policy); return ns }

// PolicyName is the name part of Policy.
func (d Decision) PolicyName() string { _, n := split(d.Policy); return n }

func split(s string) (string, string) {
	for i := 0; i < len(s); i++ {
		if s[i] == '/' {
			return s[:i], s[i+1:]
		}
	}
	return "", s
}

// Engine evaluates connections. It holds no state of its own and is safe
// for concurrent use when its sources are.
type Engine struct {
	cluster     Cluster
	netpol      *netpol.Evaluator
	authz       Authorizations
	policy      policy.Config
	trustDomain string
}

// New checks its dependencies.
func New(cluster Cluster, policies netpol.PolicySource, authz Authorizations, pol policy.Config, trustDomain string) (*Engine, error) {
	if cluster == nil || policies == nil || authz == nil {
		return nil, errors.New("authz engine: nil dependency")
	}
	if trustDomain == "" {
		return nil, errors.New("authz engine: trust domain required")
	}
	ev, err := netpol.New(policies, namespaceLabels{cluster})
	if err != nil {
		return nil, err
	}
	return &Engine{cluster: cluster, netpol: ev, authz: authz, policy: pol, trustDomain: trustDomain}, nil
}

// namespaceLabels adapts Cluster to netpol.NamespaceSource. A failed
// lookup reads as an unknown namespace, which only an empty
// namespaceSelector matches: it can only narrow what rules allow.
type namespaceLabels struct{ c Cluster }

func (n namespaceLabels) NamespaceLabels(name string) (map[string]string, bool) {
	ns, err := n.c.Namespace(name)
	if err != nil || ns == nil {
		return nil, false
	}
	return ns.Labels, true
}

// NetpolPod is the evaluator's view of a pod: labels and the container
// ports (named ports).
func NetpolPod(p *corev1.Pod) *netpol.Pod {
	if p == nil {
		return nil
	}
	np := &netpol.Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels}
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range cs {
			for _, cp := range c.Ports {
				np.Ports = append(np.Ports, netpol.ContainerPort{Name: cp.Name, Port: cp.ContainerPort, Protocol: cp.Protocol})
			}
		}
	}
	return np
}

// ProbePort reports whether port is one of p's declared network probes'
// ports (liveness, readiness, startup; TCP, HTTP or gRPC; a named port
// resolved against the same container's ports). The agent lets its
// node's address (the kubelet) reach only these in plaintext whatever
// the pod's policy, as NetworkPolicy implementations let the node probe.
func ProbePort(p *corev1.Pod, port uint16) bool {
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range cs {
			for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
				if pr == nil {
					continue
				}
				var pv intstr.IntOrString
				switch {
				case pr.TCPSocket != nil:
					pv = pr.TCPSocket.Port
				case pr.HTTPGet != nil:
					pv = pr.HTTPGet.Port
				case pr.GRPC != nil:
					pv = intstr.FromInt32(pr.GRPC.Port)
				default:
					continue
				}
				if probePortIs(pv, c.Ports, port) {
					return true
				}
			}
		}
	}
	return false
}

func probePortIs(pv intstr.IntOrString, ports []corev1.ContainerPort, port uint16) bool {
	if pv.Type == intstr.Int {
		return pv.IntVal == int32(port)
	}
	for _, cp := range ports {
		if cp.Name == pv.StrVal {
			return cp.ContainerPort == int32(port)
		}
	}
	return false
}

// PodAddr is p's address of addr's family (Status.PodIPs), else its
// first: the source address of p's connection to addr where no verified
// one is at hand (tunmeshctl).
func PodAddr(p *corev1.Pod, addr netip.Addr) netip.Addr {
	for _, pi := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(pi.IP); err == nil && a.Is4() == addr.Unmap().Is4() {
			return a
		}
	}
	return podIP(p)
}

func podIP(p *corev1.Pod) netip.Addr {
	if p == nil {
		return netip.Addr{}
	}
	a, _ := netip.ParseAddr(p.Status.PodIP) // invalid stays invalid: only ipBlock peers would look at it
	return a
}

// Outbound is the source agent's check of a meshed flow from the local pod
// src at srcIP (verified: the NIC it came from and one of the NIC's
// addresses, so of dst's family on a dual-stack pod, where
// Status.PodIP is only the first) with identity srcID to dst, the
// meshed pod dstPod: src's egress policies, then dst's whole inbound
// policy as its agent will apply it. Deciding at the source lets a denied
// flow be dropped before the pod's connection is accepted.
func (e *Engine) Outbound(src *corev1.Pod, srcIP netip.Addr, srcID spiffe.ID, dst netip.AddrPort, dstPod *corev1.Pod) Decision {
	c := netpol.Conn{
		Src:  netpol.Endpoint{IP: srcIP, Pod: NetpolPod(src)},
		Dst:  netpol.Endpoint{IP: dst.Addr(), Pod: NetpolPod(dstPod)},
		Port: int32(dst.Port()),
	}
	v := e.netpol.Egress(c)
	step := "networkpolicy " + v.String()
	if !v.Allowed {
		return Decision{Direction: "egress", Kind: KindNetworkPolicy, Policy: first(v.Isolating), Reason: ReasonNetpolDefaultDeny,
			Detail: step, Steps: []string{step}}
	}
	d := e.Inbound(Client{IP: c.Src.IP, Pod: src, ID: &srcID}, dstPod, dst.Port())
	d.Steps = append([]string{step}, d.Steps...)
	return d
}

// Egress is the source agent's NetworkPolicy egress check of a flow the
// mesh passes through in plaintext from the local pod src (verified: the
// NIC it came from) to dst, held by dstPod (nil: not a pod). Passed
// through flows leave the pod's TUN into the host through the agent's
// host TUN, not through the pod's veth, so a CNI that enforces egress on
// the veth never sees them: the agent applies it instead. Only egress:
// the destination's ingress is its own CNI's (or agent's) business.
// srcIP is src's verified address (as for Outbound); proto is "" for TCP.
func (e *Engine) Egress(src *corev1.Pod, srcIP netip.Addr, dst netip.AddrPort, dstPod *corev1.Pod, proto corev1.Protocol) Decision {
	v := e.netpol.Egress(netpol.Conn{
		Src:      netpol.Endpoint{IP: srcIP, Pod: NetpolPod(src)},
		Dst:      netpol.Endpoint{IP: dst.Addr(), Pod: NetpolPod(dstPod)},
		Port:     int32(dst.Port()),
		Protocol: proto,
	})
	step := "networkpolicy " + v.String() + " (plaintext, not meshed)"
	if !v.Allowed {
		return Decision{Direction: "egress", Kind: KindNetworkPolicy, Policy: first(v.Isolating), Reason: ReasonNetpolDefaultDeny,
			Detail: step, Steps: []string{step}}
	}
	return Decision{Allowed: true, Direction: "egress", Kind: KindNetworkPolicy, Policy: v.Policy, Reason: ReasonAllowed, Detail: step, Steps: []string{step}}
}

// Plaintext is the check of a plaintext connection from peer to port of
// the local meshed pod dst, seen on the pod's reply: the peer is whatever
// pod holds the address (unverified, as in any CNI's enforcement), or none.
func (e *Engine) Plaintext(dst *corev1.Pod, port uint16, peer netip.Addr) Decision {
	pp, err := e.cluster.PodByAddr(peer)
	if err != nil {
		return Decision{Direction: "ingress", Kind: KindLookup, Reason: ReasonLookupFailed, Detail: fmt.Sprintf("peer lookup: %v", err)}
	}
	return e.Inbound(Client{IP: peer, Pod: pp}, dst, port)
}

// PlaintextNetworkPolicy is Plaintext with NetworkPolicy only: for a
// plaintext client of one of the pod's skip-inbound ports, which bypass
// the mesh and so its identity rules (as Linkerd's skipped ports bypass
// its proxy), but not the cluster's NetworkPolicy.
func (e *Engine) PlaintextNetworkPolicy(dst *corev1.Pod, port uint16, peer netip.Addr) Decision {
	pp, err := e.cluster.PodByAddr(peer)
	if err != nil {
		return Decision{Direction: "ingress", Kind: KindLookup, Reason: ReasonLookupFailed, Detail: fmt.Sprintf("peer lookup: %v", err)}
	}
	v := e.netpol.Ingress(netpol.Conn{
		Src:  netpol.Endpoint{IP: peer, Pod: NetpolPod(pp)},
		Dst:  netpol.Endpoint{IP: podIP(dst), Pod: NetpolPod(dst)},
		Port: int32(port),
	})
	step := "networkpolicy " + v.String() + " (skip-inbound port: identity rules do not apply)"
	if !v.Allowed {
		return Decision{Direction: "ingress", Kind: KindNetworkPolicy, Policy: first(v.Isolating), Reason: ReasonNetpolDefaultDeny, Detail: step, Steps: []string{step}}
	}
	return Decision{Allowed: true, Direction: "ingress", Kind: KindNetworkPolicy, Policy: v.Policy, Reason: ReasonAllowed, Detail: step, Steps: []string{step}}
}

// Inbound is the destination's check: dst's NetworkPolicy ingress rules,
// then identity (Authorizations selecting dst, else its default inbound
// policy). dst must be a meshed pod.
func (e *Engine) Inbound(client Client, dst *corev1.Pod, port uint16) Decision {
	var steps []string
	dp := NetpolPod(dst)
	v := e.netpol.Ingress(netpol.Conn{
		Src:  netpol.Endpoint{IP: client.IP, Pod: NetpolPod(client.Pod)},
		Dst:  netpol.Endpoint{IP: podIP(dst), Pod: dp},
		Port: int32(port),
	})
	steps = append(steps, "networkpolicy "+v.String())
	if !v.Allowed {
		return Decision{Direction: "ingress", Kind: KindNetworkPolicy, Policy: first(v.Isolating), Reason: ReasonNetpolDefaultDeny,
			Detail: steps[0], Steps: steps}
	}
	allow := func(kind, pol, detail string) Decision {
		steps = append(steps, detail)
		return Decision{Allowed: true, Direction: "ingress", Kind: kind, Policy: pol, Reason: ReasonAllowed, Detail: detail, Steps: steps}
	}
	deny := func(kind, pol, reason, detail string) Decision {
		steps = append(steps, detail)
		return Decision{Direction: "ingress", Kind: kind, Policy: pol, Reason: reason, Detail: detail, Steps: steps}
	}

	var selecting []*Authorization
	for _, a := range e.authz.Authorizations(dst.Namespace) {
		if a.Selects(dst.Labels) {
			selecting = append(selecting, a)
		}
	}
	if len(selecting) > 0 {
		if client.ID == nil {
			return deny(KindAuthorization, selecting[0].String(), ReasonPlaintextRefused,
				fmt.Sprintf("authorization: plaintext refused: authorizations %s select the pod and admit mesh identities only", names(selecting)))
		}
		var ports []corev1.ContainerPort
		for _, cs := range [][]corev1.Container{dst.Spec.InitContainers, dst.Spec.Containers} { // as NetpolPod: sidecars are init containers
			for _, c := range cs {
				ports = append(ports, c.Ports...)
			}
		}
		for _, a := range selecting {
			if a.admitsPort(int32(port), ports) && a.admitsIdentity(*client.ID, e.trustDomain) {
				return allow(KindAuthorization, a.String(), fmt.Sprintf("authorization: %s allowed by authorization %s", client.ID, a))
			}
		}
		return deny(KindAuthorization, selecting[0].String(), ReasonNotAuthorized,
			fmt.Sprintf("authorization: %s on port %d admitted by none of the authorizations selecting the pod %s", client.ID, port, names(selecting)))
	}

	di, src, err := e.DefaultInbound(dst)
	if err != nil {
		return deny(KindLookup, "", ReasonLookupFailed, fmt.Sprintf("default inbound policy: %v", err))
	}
	pol := dst.Namespace + "/" + di.String()
	switch {
	case client.ID == nil && !di.AllowsPlaintext():
		reason := ReasonPlaintextRefused
		if di == policy.Deny {
			reason = ReasonDefaultDeny
		}
		return deny(KindDefaultInbound, pol, reason, fmt.Sprintf("default inbound policy %s (%s): plaintext refused", di, src))
	case client.ID != nil && !di.AllowsMeshed():
		return deny(KindDefaultInbound, pol, ReasonDefaultDeny, fmt.Sprintf("default inbound policy %s (%s): %s refused", di, src, client.ID))
	case client.ID != nil && di == policy.ClusterAuthenticated && client.ID.TrustDomain != e.trustDomain:
		return deny(KindDefaultInbound, pol, ReasonNotAuthorized, fmt.Sprintf("default inbound policy %s (%s): %s is not of trust domain %s", di, src, client.ID, e.trustDomain))
	}
	who := "plaintext client"
	if client.ID != nil {
		who = client.ID.String()
	}
	return allow(KindDefaultInbound, pol, fmt.Sprintf("default inbound policy %s (%s) allows %s", di, src, who))
}

// SourceInvalidAnnotation is DefaultInbound's source for a value it could
// not use (the pod gets deny).
const SourceInvalidAnnotation = "invalid annotation, fail closed"

// DefaultInbound resolves the pod's default inbound policy from the live
// pod and namespace annotations (so a change applies to new connections),
// and says where it came from. A bad value is Deny. It is resolved
// whatever the pod's other settings say: a pod the agent still serves
// keeps the policy it declares even if its inject annotation now says
// disabled. A namespace lookup that fails, NotFound included, is an
// error (the caller holds or refuses): a pod seen before its namespace
// must not be judged without the namespace's annotations (review
// finding 6).
func (e *Engine) DefaultInbound(p *corev1.Pod) (policy.DefaultInbound, string, error) {
	ns, err := e.cluster.Namespace(p.Namespace)
	switch {
	case err != nil:
		return policy.Deny, "", fmt.Errorf("namespace %s: %w", p.Namespace, err)
	case ns == nil:
		return policy.Deny, "", fmt.Errorf("namespace %s: %w", p.Namespace, errNamespaceUnknown)
	}
	di, err := policy.DefaultInboundFor(p, ns)
	src := "default"
	switch {
	case err != nil && di == policy.Deny && errors.Is(err, policy.ErrInvalidDefaultInbound):
		src = SourceInvalidAnnotation
	case hasKey(p.Annotations):
		src = "pod annotation"
	case hasKey(ns.Annotations):
		src = "namespace annotation"
	}
	return di, src, nil
}

var errNamespaceUnknown = errors.New("namespace not in the cluster view")

func hasKey(a map[string]string) bool {
	_, t := a[policy.AnnotationDefaultInboundPolicy]
	_, l := a[policy.LinkerdAnnotationDefaultInboundPolicy]
	return t || l
}

// IngressPolicies lists the NetworkPolicies that isolate dst for ingress
// and the Authorizations that select it (tunmeshctl authz).
func (e *Engine) IngressPolicies(dst *corev1.Pod, policies netpol.PolicySource) (netpols []string, authzs []string) {
	for _, p := range policies.Policies(dst.Namespace) {
		if p.HasType(networkingv1.PolicyTypeIngress) && p.Selects(dst.Labels) {
			netpols = append(netpols, p.String())
		}
	}
	for _, a := range e.authz.Authorizations(dst.Namespace) {
		if a.Selects(dst.Labels) {
			authzs = append(authzs, a.String())
		}
	}
	return netpols, authzs
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

func names(as []*Authorization) string {
	s := "["
	for i, a := range as {
		if i > 0 {
			s += ", "
		}
		s += a.String()
	}
	return s + "]"
}
