package policy

import (
	"errors"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
)

// Annotation keys read by Config.For.
const (
	AnnotationInject            = "tunmesh.io/inject"
	AnnotationSkipInboundPorts  = "config.tunmesh.io/skip-inbound-ports"
	AnnotationSkipOutboundPorts = "config.tunmesh.io/skip-outbound-ports"

	LinkerdAnnotationInject            = "linkerd.io/inject"
	LinkerdAnnotationSkipInboundPorts  = "config.linkerd.io/skip-inbound-ports"
	LinkerdAnnotationSkipOutboundPorts = "config.linkerd.io/skip-outbound-ports"
)

// Values of Policy.Reason. They are stable snake_case strings because the
// agent uses them as log values and metric labels.
const (
	ReasonInjectDisabled    = "inject_disabled"
	ReasonHostNetwork       = "host_network"
	ReasonExcludedNamespace = "excluded_namespace"
)

var (
	// ErrInvalidAnnotation is wrapped by every error about an annotation
	// value that Config.For could not use.
	ErrInvalidAnnotation = errors.New("invalid annotation")
	// ErrNamespaceMismatch means Config.For was handed a namespace other than
	// the pod's; it is a bug in the caller, reported rather than panicking.
	ErrNamespaceMismatch = errors.New("namespace is not the pod's")
)

// Policy is how the mesh treats one pod. It is an immutable value.
type Policy struct {
	// Meshed is whether the pod gets a TUN and its TCP traffic is carried
	// over mTLS.
	Meshed bool
	// Reason says why the pod is not meshed (one of the Reason constants)
	// and is "" when Meshed is true.
	Reason string
	// SkipInbound holds the pod's ports that peers reach in plaintext
	// passthrough; SkipOutbound the destination ports the pod itself reaches
	// in passthrough. Both are empty when Meshed is false.
	SkipInbound, SkipOutbound PortSet
	// DefaultInbound is what the pod accepts when no Authorization selects
	// it (default AllUnauthenticated; Deny for an invalid value). Empty
	// when Meshed is false: the agent enforces nothing for such a pod.
	DefaultInbound DefaultInbound
}

// SkipsInbound reports whether flows to port on this pod bypass the mesh.
func (p Policy) SkipsInbound(port uint16) bool { return p.SkipInbound.Contains(port) }

// SkipsOutbound reports whether flows from this pod to port bypass the mesh.
func (p Policy) SkipsOutbound(port uint16) bool { return p.SkipOutbound.Contains(port) }

// Config is the node-wide part of the policy. The zero value excludes no
// namespace.
type Config struct {
	// ExcludedNamespaces are never meshed whatever their annotations say,
	// typically kube-system and tunmesh's own namespace: the mesh must not
	// be able to cut off the components it depends on.
	ExcludedNamespaces []string
}

// AnnotationError is an annotation value Config.For refused. It unwraps to
// both ErrInvalidAnnotation and Err.
type AnnotationError struct {
	// Object names the annotated object: `pod "ns/name"` or
	// `namespace "ns"`.
	Object string
	Key    string
	Value  string
	// Err says what is wrong with Value; for port lists it wraps
	// ErrInvalidPorts.
	Err error
	// Fallback says what was used instead, for the reader of the event.
	Fallback string
}

func (e *AnnotationError) Error() string {
	return fmt.Sprintf("%s: %v %s=%q: %v; %s",
		e.Object, ErrInvalidAnnotation, e.Key, truncate(e.Value), e.Err, e.Fallback)
}

func (e *AnnotationError) Unwrap() []error { return []error{ErrInvalidAnnotation, e.Err} }

// setting is one policy knob and the keys that spell it, in precedence
// order on a single object.
type setting struct {
	keys     [2]string // tunmesh key, then Linkerd key
	fallback string    // for AnnotationError.Fallback
}

var (
	injectSetting = setting{
		keys:     [2]string{AnnotationInject, LinkerdAnnotationInject},
		fallback: "using the default: enabled",
	}
	skipInboundSetting = setting{
		keys:     [2]string{AnnotationSkipInboundPorts, LinkerdAnnotationSkipInboundPorts},
		fallback: "ignored: no inbound ports skipped",
	}
	skipOutboundSetting = setting{
		keys:     [2]string{AnnotationSkipOutboundPorts, LinkerdAnnotationSkipOutboundPorts},
		fallback: "ignored: no outbound ports skipped",
	}
)

// source is an annotated object, named for errors.
type source struct {
	name        string
	annotations map[string]string
}

// lookup returns the value that governs s: the first key present on the
// first source that has one. ok is false when no source sets s.
func lookup(srcs []source, s setting) (src source, key, value string, ok bool) {
	for _, src := range srcs {
		for _, key := range s.keys {
			if v, ok := src.annotations[key]; ok {
				return src, key, v, true
			}
		}
	}
	return source{}, "", "", false
}

// For returns the policy for pod, whose namespace object is ns (nil if not
// known, in which case only the pod's annotations count). pod must not be
// nil. Values that cannot be used are replaced by defaults and reported in
// the returned errors, one each; see the package doc for what the caller does
// with them. For is safe for concurrent use.
func (c Config) For(pod *corev1.Pod, ns *corev1.Namespace) (Policy, []error) {
	var errs []error
	podName := fmt.Sprintf("pod %q", pod.Namespace+"/"+pod.Name)
	if ns != nil && ns.Name != pod.Namespace {
		errs = append(errs, fmt.Errorf("policy for %s: namespace %q: %w", podName, ns.Name, ErrNamespaceMismatch))
		ns = nil
	}

	// Checked before any annotation so that pods the mesh must not touch
	// produce no warnings about annotations that cannot matter.
	if pod.Spec.HostNetwork {
		return Policy{Reason: ReasonHostNetwork}, errs
	}
	if slices.Contains(c.ExcludedNamespaces, pod.Namespace) {
		return Policy{Reason: ReasonExcludedNamespace}, errs
	}

	srcs := []source{{name: podName, annotations: pod.Annotations}}
	if ns != nil {
		srcs = append(srcs, source{name: fmt.Sprintf("namespace %q", ns.Name), annotations: ns.Annotations})
	}

	if src, key, v, ok := lookup(srcs, injectSetting); ok {
		enabled, err := parseInject(key, v)
		if err != nil {
			errs = append(errs, &AnnotationError{Object: src.name, Key: key, Value: v, Err: err, Fallback: injectSetting.fallback})
		} else if !enabled {
			return Policy{Reason: ReasonInjectDisabled}, errs
		}
	}

	p := Policy{Meshed: true}
	var err error
	if p.SkipInbound, err = skipPorts(srcs, skipInboundSetting); err != nil {
		errs = append(errs, err)
	}
	if p.SkipOutbound, err = skipPorts(srcs, skipOutboundSetting); err != nil {
		errs = append(errs, err)
	}
	if p.DefaultInbound, err = defaultInbound(srcs); err != nil {
		errs = append(errs, err)
	}
	return p, errs
}

// parseInject parses the value of an inject key. Values are matched exactly,
// as Linkerd does: "Disabled" is an error, not a silent yes or no.
func parseInject(key, v string) (enabled bool, err error) {
	switch {
	case v == "enabled":
		return true, nil
	case v == "disabled":
		return false, nil
	case key == LinkerdAnnotationInject && v == "ingress":
		return true, nil
	case key == LinkerdAnnotationInject:
		return true, errors.New(`want "enabled", "ingress" or "disabled"`)
	default:
		return true, errors.New(`want "enabled" or "disabled"`)
	}
}

// skipPorts resolves a skip-ports setting. A bad list is reported and
// treated as empty rather than falling back to a lower-precedence source:
// the object that set it meant to override those.
func skipPorts(srcs []source, s setting) (PortSet, error) {
	src, key, v, ok := lookup(srcs, s)
	if !ok {
		return PortSet{}, nil
	}
	set, err := ParsePorts(v)
	if err != nil {
		return PortSet{}, &AnnotationError{Object: src.name, Key: key, Value: v, Err: err, Fallback: s.fallback}
	}
	return set, nil
}
