package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// PolicySource gives the compiled policies of one namespace. The evaluator
// reports the first allowing policy in the order returned, so a source should
// return them in a stable order (Snapshot sorts by name).
type PolicySource interface {
	Policies(namespace string) []*Policy
}

// NamespaceSource gives a namespace's labels; ok is false for a namespace
// the source does not know (yet).
type NamespaceSource interface {
	NamespaceLabels(name string) (nsLabels map[string]string, ok bool)
}

// Pod is what the evaluator needs to know about a pod.
type Pod struct {
	Namespace string
	Name      string
	Labels    map[string]string
	// Ports are the pod's containers' ports, for named ports in policies.
	Ports []ContainerPort
}

// ContainerPort is one entry of a container's ports list.
type ContainerPort struct {
	Name string
	Port int32
	// Protocol defaults to TCP when empty, as in the API.
	Protocol corev1.Protocol
}

// Endpoint is one end of a connection: an IP and, when the IP belongs to a
// pod of the cluster, that pod. Pod nil means a non-pod address (a node, an
// external client), which only ipBlock peers can match.
type Endpoint struct {
	IP  netip.Addr
	Pod *Pod
}

// Conn is one connection attempt: Src dials Dst on Port.
type Conn struct {
	Src, Dst Endpoint
	Port     int32
	// Protocol defaults to TCP when empty.
	Protocol corev1.Protocol
}

// Reason says why a verdict was reached. Its values are stable snake_case
// strings, usable as log values and metric labels.
type Reason string

const (
	// ReasonNotIsolated: no policy of the direction selects the pod (or the
	// end is not a pod), so the direction is not restricted.
	ReasonNotIsolated Reason = "not_isolated"
	// ReasonAllowedByPolicy: a rule of Verdict.Policy matched.
	ReasonAllowedByPolicy Reason = "allowed_by_policy"
	// ReasonDefaultDeny: policies selected the pod (Verdict.Isolating) and
	// none of their rules matched.
	ReasonDefaultDeny Reason = "default_deny"
)

// Verdict is the outcome of one direction's evaluation.
type Verdict struct {
	Allowed   bool
	Direction networkingv1.PolicyType
	Reason    Reason
	// Policy ("namespace/name") and Rule (index into its ingress or egress
	// list) that allowed the connection; set with ReasonAllowedByPolicy,
	// otherwise "" and -1.
	Policy string
	Rule   int
	// Isolating names ("namespace/name") the policies of this direction that
	// select the pod, in source order; set unless ReasonNotIsolated.
	Isolating []string
}

// String is the human form of the verdict, as logs and `tunmeshctl authz`
// print it.
func (v Verdict) String() string {
	dir := strings.ToLower(string(v.Direction))
	switch v.Reason {
	case ReasonAllowedByPolicy:
		return fmt.Sprintf("%s allowed by policy %s rule %d", dir, v.Policy, v.Rule)
	case ReasonDefaultDeny:
		return fmt.Sprintf("%s denied: default deny by policies [%s]", dir, strings.Join(v.Isolating, ", "))
	default:
		return dir + " allowed: no policy selects the pod"
	}
}

// Evaluator decides connections against NetworkPolicy. It holds no state of
// its own, so it is safe for concurrent use as long as its sources are.
type Evaluator struct {
	policies   PolicySource
	namespaces NamespaceSource
}

// New returns an Evaluator over the given sources.
func New(policies PolicySource, namespaces NamespaceSource) (*Evaluator, error) {
	if policies == nil {
		return nil, errors.New("netpol: nil PolicySource")
	}
	if namespaces == nil {
		return nil, errors.New("netpol: nil NamespaceSource")
	}
	return &Evaluator{policies: policies, namespaces: namespaces}, nil
}

// Egress applies the source pod's egress policies to c (the source agent's
// check). A source that is not a pod is not isolated.
func (e *Evaluator) Egress(c Conn) Verdict {
	return e.direction(networkingv1.PolicyTypeEgress, c.Src.Pod, c.Dst, c)
}

// Ingress applies the destination pod's ingress policies to c (the
// destination agent's check). A destination that is not a pod is not
// isolated.
func (e *Evaluator) Ingress(c Conn) Verdict {
	return e.direction(networkingv1.PolicyTypeIngress, c.Dst.Pod, c.Src, c)
}

// Decide applies both directions, as a connection inside one cluster must
// pass both: it returns the egress verdict when that denies, else the
// ingress verdict.
func (e *Evaluator) Decide(c Conn) Verdict {
	if v := e.Egress(c); !v.Allowed {
		return v
	}
	return e.Ingress(c)
}

// direction evaluates the policies of subject (the pod the policies are
// about) for traffic with peer.
func (e *Evaluator) direction(dir networkingv1.PolicyType, subject *Pod, peer Endpoint, c Conn) Verdict {
	v := Verdict{Allowed: true, Direction: dir, Reason: ReasonNotIsolated, Rule: -1}
	if subject == nil {
		return v
	}
	proto := c.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	peerIP := peer.IP.Unmap()
	var peerNS map[string]string
	var peerNSKnown, peerNSLooked bool
	podLabels := labels.Set(subject.Labels)

	policies := e.policies.Policies(subject.Namespace)
	for _, p := range policies {
		if !p.HasType(dir) || p.podSelector == nil || !p.podSelector.Matches(podLabels) {
			continue
		}
		if v.Isolating == nil {
			// One allocation per verdict rather than one per growth.
			v.Isolating = make([]string, 0, len(policies))
		}
		v.Isolating = append(v.Isolating, p.String())
		if v.Reason == ReasonAllowedByPolicy {
			// Already allowed; keep listing the isolating policies.
			continue
		}
		rules := p.ingressRules
		if dir == networkingv1.PolicyTypeEgress {
			rules = p.egressRules
		}
		for i, r := range rules {
			// Named ports are always resolved on the destination pod.
			if !portsMatch(r.ports, c.Dst.Pod, c.Port, proto) {
				continue
			}
			if len(r.peers) > 0 {
				if peer.Pod != nil && !peerNSLooked {
					peerNS, peerNSKnown = e.namespaces.NamespaceLabels(peer.Pod.Namespace)
					peerNSLooked = true
				}
				if !peersMatch(r.peers, peer.Pod, peerIP, peerNS, peerNSKnown) {
					continue
				}
			}
			v.Reason, v.Policy, v.Rule = ReasonAllowedByPolicy, p.String(), i
			break
		}
	}
	if len(v.Isolating) > 0 && v.Reason != ReasonAllowedByPolicy {
		v.Allowed, v.Reason = false, ReasonDefaultDeny
	}
	return v
}

func portsMatch(ports []port, dst *Pod, n int32, proto corev1.Protocol) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		if p.invalid || p.protocol != proto {
			continue
		}
		switch {
		case p.all:
			return true
		case p.name != "":
			if dst != nil && dst.hasNamedPort(p.name, n, proto) {
				return true
			}
		case p.lo <= n && n <= p.hi:
			return true
		}
	}
	return false
}

func (p *Pod) hasNamedPort(name string, n int32, proto corev1.Protocol) bool {
	for _, cp := range p.Ports {
		cproto := cp.Protocol
		if cproto == "" {
			cproto = corev1.ProtocolTCP
		}
		if cp.Name == name && cp.Port == n && cproto == proto {
			return true
		}
	}
	return false
}

func peersMatch(peers []peer, pod *Pod, ip netip.Addr, nsLabels map[string]string, nsKnown bool) bool {
	for i := range peers {
		p := &peers[i]
		if p.invalid {
			continue
		}
		if p.isBlock {
			if ip.IsValid() && p.cidr.Contains(ip) && !containsAny(p.except, ip) {
				return true
			}
			continue
		}
		// Selectors select pods only.
		if pod == nil {
			continue
		}
		if p.podSel != nil && !p.podSel.Matches(labels.Set(pod.Labels)) {
			continue
		}
		if p.nsSel == nil {
			if pod.Namespace == p.ownNamespace {
				return true
			}
			continue
		}
		// An empty namespaceSelector selects every namespace, known or not;
		// any other selector needs the namespace's labels.
		if p.nsSelEmpty || (nsKnown && p.nsSel.Matches(labels.Set(nsLabels))) {
			return true
		}
	}
	return false
}

func containsAny(prefixes []netip.Prefix, ip netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
