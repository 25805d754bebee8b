package policy

import (
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
)

// Annotation keys of the default inbound policy, with Linkerd's spelling
// accepted so that annotated workloads migrate unchanged.
const (
	AnnotationDefaultInboundPolicy        = "config.tunmesh.io/default-inbound-policy"
	LinkerdAnnotationDefaultInboundPolicy = "config.linkerd.io/default-inbound-policy"
)

// DefaultInbound is what a meshed pod accepts when no Authorization selects
// it (see docs/policy.md). NetworkPolicy applies on top in every case.
type DefaultInbound string

// Values of DefaultInbound, Linkerd's names.
const (
	// AllUnauthenticated accepts meshed and plaintext clients (the default,
	// and tunmesh's behaviour before default inbound policies existed).
	AllUnauthenticated DefaultInbound = "all-unauthenticated"
	// ClusterUnauthenticated is Linkerd's "plaintext from cluster networks
	// only". The agent only ever sees plaintext from cluster networks (the
	// pod's replies to other peers do not cross tm0), so it behaves as
	// AllUnauthenticated; accepted so that Linkerd manifests migrate.
	ClusterUnauthenticated DefaultInbound = "cluster-unauthenticated"
	// AllAuthenticated accepts meshed clients with any identity the
	// agents' trust anchors verify, and refuses plaintext.
	AllAuthenticated DefaultInbound = "all-authenticated"
	// ClusterAuthenticated accepts meshed clients of this cluster's trust
	// domain, and refuses plaintext. The identity service issues only
	// identities of its trust domain, so today it admits what
	// AllAuthenticated admits.
	ClusterAuthenticated DefaultInbound = "cluster-authenticated"
	// Deny refuses every client, meshed or not, that no Authorization
	// admits.
	Deny DefaultInbound = "deny"
)

// ErrInvalidDefaultInbound is wrapped (inside an AnnotationError) when a
// default-inbound-policy value is none of the known names.
var ErrInvalidDefaultInbound = errors.New(`want one of "all-unauthenticated", "cluster-unauthenticated", "all-authenticated", "cluster-authenticated", "deny"`)

// ParseDefaultInbound parses an annotation value. Values are matched
// exactly, as Linkerd does.
func ParseDefaultInbound(v string) (DefaultInbound, error) {
	switch d := DefaultInbound(v); d {
	case AllUnauthenticated, ClusterUnauthenticated, AllAuthenticated, ClusterAuthenticated, Deny:
		return d, nil
	}
	return "", fmt.Errorf("default inbound policy %q: %w", truncate(v), ErrInvalidDefaultInbound)
}

// AllowsPlaintext reports whether clients without a mesh identity are
// accepted.
func (d DefaultInbound) AllowsPlaintext() bool {
	return d == AllUnauthenticated || d == ClusterUnauthenticated || d == ""
}

// AllowsMeshed reports whether any authenticated client is accepted.
func (d DefaultInbound) AllowsMeshed() bool { return d != Deny }

// String is the value, "all-unauthenticated" for the zero value.
func (d DefaultInbound) String() string {
	if d == "" {
		return string(AllUnauthenticated)
	}
	return string(d)
}

var defaultInboundSetting = setting{
	keys: [2]string{AnnotationDefaultInboundPolicy, LinkerdAnnotationDefaultInboundPolicy},
	// Fail closed: a value that was meant to restrict must not open the
	// pod to everyone because of a typo.
	fallback: "using deny (fail closed) until the value is fixed",
}

// DefaultInboundFor resolves only the pod's default inbound policy from
// its annotations and its namespace's (ns nil: none), whatever the other
// settings say. For leaves DefaultInbound empty (all-unauthenticated) for
// a pod it would not mesh; a pod that is still attached when it should
// not be (its inject annotation changed after attach, or a failed CNI
// DEL) must keep the policy it declares, not become open (review finding
// 7). A bad value is Deny with the error.
func DefaultInboundFor(pod *corev1.Pod, ns *corev1.Namespace) (DefaultInbound, error) {
	srcs := []source{{name: fmt.Sprintf("pod %q", pod.Namespace+"/"+pod.Name), annotations: pod.Annotations}}
	if ns != nil && ns.Name == pod.Namespace {
		srcs = append(srcs, source{name: fmt.Sprintf("namespace %q", ns.Name), annotations: ns.Annotations})
	}
	return defaultInbound(srcs)
}

// defaultInbound resolves the setting over srcs (pod, then namespace). A
// bad value on the object that governs is not skipped for a lower one: it
// is reported and the pod gets Deny.
func defaultInbound(srcs []source) (DefaultInbound, error) {
	src, key, v, ok := lookup(srcs, defaultInboundSetting)
	if !ok {
		return AllUnauthenticated, nil
	}
	d, err := ParseDefaultInbound(v)
	if err != nil {
		return Deny, &AnnotationError{Object: src.name, Key: key, Value: v, Err: ErrInvalidDefaultInbound, Fallback: defaultInboundSetting.fallback}
	}
	return d, nil
}
