package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

var (
	// ErrInvalidPolicy is wrapped by every error Compile returns. The API
	// server validates NetworkPolicy, so these only appear with version skew
	// or objects that bypassed validation; the caller counts them.
	ErrInvalidPolicy = errors.New("invalid network policy")
	// ErrInvalidSelector means a label selector could not be converted
	// (metav1.LabelSelectorAsSelector failed). It matches nothing.
	ErrInvalidSelector = errors.New("invalid label selector")
	// ErrInvalidIPBlock means an ipBlock CIDR or except entry did not parse.
	// The peer matches nothing.
	ErrInvalidIPBlock = errors.New("invalid ipBlock")
	// ErrInvalidPeer means a peer set none of podSelector, namespaceSelector
	// and ipBlock. It matches nothing.
	ErrInvalidPeer = errors.New("invalid peer")
	// ErrInvalidPort means a port entry the API would reject (a protocol
	// other than TCP, UDP, SCTP; an invalid port name; endPort with a named
	// port or without a port; endPort below port; a port outside 1-65535).
	// It matches nothing.
	ErrInvalidPort = errors.New("invalid port")
)

// Policy is a NetworkPolicy compiled for evaluation: selectors converted,
// CIDRs parsed and policyTypes defaulted once, when the policy changes, rather
// than on every connection. It is immutable and safe for concurrent use.
type Policy struct {
	namespace, name string
	id              string // "namespace/name", built once: verdicts carry it
	// podSelector chooses the pods the policy applies to; nil when it was
	// invalid, and then the policy applies to no pod.
	podSelector labels.Selector
	ingress     bool // policyTypes contains Ingress
	egress      bool // policyTypes contains Egress
	// ingressRules and egressRules are nil-vs-empty agnostic: with the type
	// set, no rules means deny all of that direction.
	ingressRules []rule
	egressRules  []rule
}

// rule is one ingress or egress rule: traffic matches when its port matches
// any of ports and its peer matches any of peers; an empty list matches all.
type rule struct {
	ports []port
	peers []peer
}

type port struct {
	protocol corev1.Protocol
	all      bool   // no port given: every port of protocol
	lo, hi   int32  // numeric port, or range with endPort
	name     string // named port, resolved on the destination pod
	invalid  bool
}

type peer struct {
	// ipBlock
	isBlock bool
	cidr    netip.Prefix
	except  []netip.Prefix
	// selectors; nil means not set. When nsSel is nil, ownNamespace is the
	// policy's namespace, the only one podSel looks in.
	podSel       labels.Selector
	nsSel        labels.Selector
	ownNamespace string
	// nsSelEmpty: namespaceSelector is {} and selects every namespace,
	// including ones the NamespaceSource does not know yet.
	nsSelEmpty bool
	invalid    bool
}

// Namespace and Name identify the policy.
func (p *Policy) Namespace() string { return p.namespace }

// Name is the policy's metadata.name.
func (p *Policy) Name() string { return p.name }

// String is "namespace/name", the form used in verdicts, logs and metrics.
func (p *Policy) String() string { return p.id }

// Selects reports whether the policy applies to pods with these labels
// (the pod must also be in the policy's namespace; the caller asks only for
// the pod's namespace's policies).
func (p *Policy) Selects(podLabels map[string]string) bool {
	return p.podSelector != nil && p.podSelector.Matches(labels.Set(podLabels))
}

// HasType reports whether the policy, after defaulting, has policy type t.
func (p *Policy) HasType(t networkingv1.PolicyType) bool {
	switch t {
	case networkingv1.PolicyTypeIngress:
		return p.ingress
	case networkingv1.PolicyTypeEgress:
		return p.egress
	}
	return false
}

// Compile converts np for evaluation. It always returns a usable Policy; the
// error (if any) joins one error per invalid part, each wrapping
// ErrInvalidPolicy and a specific sentinel. Invalid parts match nothing: an
// invalid spec.podSelector makes the whole policy apply to no pod (as the
// reference implementation does), an invalid peer or port never matches.
//
// policyTypes is defaulted as the API server does for objects that omit it:
// Ingress always, Egress when there are egress rules.
func Compile(np *networkingv1.NetworkPolicy) (*Policy, error) {
	p := &Policy{namespace: np.Namespace, name: np.Name, id: np.Namespace + "/" + np.Name}
	c := compiler{policy: p.String()}

	p.podSelector = c.selector(&np.Spec.PodSelector, "spec.podSelector")

	if len(np.Spec.PolicyTypes) == 0 {
		p.ingress = true
		p.egress = len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			p.ingress = true
		case networkingv1.PolicyTypeEgress:
			p.egress = true
		default:
			c.fail(fmt.Sprintf("spec.policyTypes %q", t), errors.New("unknown policy type"))
		}
	}

	// Rules of a type the policy does not have are ignored, as the API says,
	// but are still compiled so that their errors are reported.
	for i, r := range np.Spec.Ingress {
		path := fmt.Sprintf("spec.ingress[%d]", i)
		p.ingressRules = append(p.ingressRules, rule{
			ports: c.ports(r.Ports, path),
			peers: c.peers(r.From, path+".from", p.namespace),
		})
	}
	for i, r := range np.Spec.Egress {
		path := fmt.Sprintf("spec.egress[%d]", i)
		p.egressRules = append(p.egressRules, rule{
			ports: c.ports(r.Ports, path),
			peers: c.peers(r.To, path+".to", p.namespace),
		})
	}
	return p, errors.Join(c.errs...)
}

type compiler struct {
	policy string
	errs   []error
}

func (c *compiler) fail(path string, err error) {
	c.errs = append(c.errs, fmt.Errorf("%w %s: %s: %w", ErrInvalidPolicy, c.policy, path, err))
}

// selector converts s; nil (not set) stays nil. An invalid selector is
// reported and replaced by labels.Nothing().
func (c *compiler) selector(s *metav1.LabelSelector, path string) labels.Selector {
	if s == nil {
		return nil
	}
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		c.fail(path, fmt.Errorf("%w: %w", ErrInvalidSelector, err))
		return labels.Nothing()
	}
	return sel
}

func (c *compiler) ports(in []networkingv1.NetworkPolicyPort, path string) []port {
	if len(in) == 0 {
		return nil
	}
	out := make([]port, 0, len(in))
	for i, np := range in {
		pp := fmt.Sprintf("%s.ports[%d]", path, i)
		p := port{protocol: corev1.ProtocolTCP}
		bad := func(why string) {
			p.invalid = true
			c.fail(pp, fmt.Errorf("%w: %s", ErrInvalidPort, why))
		}
		if np.Protocol != nil {
			p.protocol = *np.Protocol
			switch p.protocol {
			case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
			default:
				bad(fmt.Sprintf("protocol %q", p.protocol))
			}
		}
		switch {
		case np.Port == nil:
			p.all = true
			if np.EndPort != nil {
				bad("endPort without port")
			}
		case np.Port.Type == intstr.String:
			p.name = np.Port.StrVal
			if errs := validation.IsValidPortName(p.name); len(errs) > 0 {
				// Also keeps "80" (a string) from being read as a number,
				// which the API forbids and implementations read differently.
				bad(fmt.Sprintf("port name %q: %s", p.name, strings.Join(errs, "; ")))
			}
			if np.EndPort != nil {
				bad("endPort with a named port")
			}
		default:
			p.lo, p.hi = np.Port.IntVal, np.Port.IntVal
			if np.EndPort != nil {
				p.hi = *np.EndPort
			}
			if p.lo < 1 || p.lo > 65535 || p.hi < p.lo || p.hi > 65535 {
				bad(fmt.Sprintf("port range %d-%d", p.lo, p.hi))
			}
		}
		out = append(out, p)
	}
	return out
}

func (c *compiler) peers(in []networkingv1.NetworkPolicyPeer, path, policyNamespace string) []peer {
	if len(in) == 0 {
		return nil
	}
	out := make([]peer, 0, len(in))
	for i, np := range in {
		pp := fmt.Sprintf("%s[%d]", path, i)
		var p peer
		switch {
		case np.IPBlock != nil:
			// The API forbids ipBlock together with selectors; the reference
			// implementation then looks at ipBlock only, and so do we.
			p.isBlock = true
			var err error
			if p.cidr, err = parseCIDR(np.IPBlock.CIDR); err != nil {
				p.invalid = true
				c.fail(pp+".ipBlock.cidr", fmt.Errorf("%w: %w", ErrInvalidIPBlock, err))
			}
			for j, e := range np.IPBlock.Except {
				ex, err := parseCIDR(e)
				if err != nil {
					p.invalid = true
					c.fail(fmt.Sprintf("%s.ipBlock.except[%d]", pp, j), fmt.Errorf("%w: %w", ErrInvalidIPBlock, err))
					continue
				}
				p.except = append(p.except, ex)
			}
		case np.PodSelector == nil && np.NamespaceSelector == nil:
			p.invalid = true
			c.fail(pp, fmt.Errorf("%w: none of podSelector, namespaceSelector, ipBlock", ErrInvalidPeer))
		default:
			p.podSel = c.selector(np.PodSelector, pp+".podSelector")
			p.nsSel = c.selector(np.NamespaceSelector, pp+".namespaceSelector")
			if np.NamespaceSelector != nil && p.nsSel.Empty() {
				p.nsSelEmpty = true
			}
			if p.nsSel == nil {
				// podSelector alone selects pods of the policy's own
				// namespace, whatever that namespace's labels.
				p.ownNamespace = policyNamespace
			}
		}
		out = append(out, p)
	}
	return out
}

// parseCIDR accepts what the API accepts: an IPv4 or IPv6 prefix, host bits
// allowed (they are masked off, as net.ParseCIDR does).
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parse cidr %q: %w", s, err)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("parse cidr %q: IPv4-mapped IPv6 prefix", s)
	}
	return p.Masked(), nil
}
