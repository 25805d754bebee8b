package authz

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// The Authorization custom resource (deploy/authorization-crd.yaml).
const (
	Group    = "policy.tunmesh.io"
	Version  = "v1alpha1"
	Kind     = "Authorization"
	Resource = "authorizations"
)

// GroupVersionResource is what informers and clients ask for.
var GroupVersionResource = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// ErrInvalidAuthorization is wrapped by every error about an Authorization
// object the agent cannot use as written.
var ErrInvalidAuthorization = errors.New("invalid authorization")

// AuthorizationObject is the Go form of the custom resource, as decoded
// from the API (no code generator: FromUnstructured converts).
type AuthorizationObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              AuthorizationSpec `json:"spec"`
}

// AuthorizationSpec says which identities may open meshed connections to
// which pods and ports of the object's namespace.
type AuthorizationSpec struct {
	// PodSelector chooses the pods of the namespace it applies to; {}
	// selects every pod of the namespace.
	PodSelector metav1.LabelSelector `json:"podSelector"`
	// Ports the identities may reach; empty means every port.
	Ports []AuthorizationPort `json:"ports,omitempty"`
	// From lists the identities admitted (at least one).
	From []IdentityRef `json:"from"`
}

// AuthorizationPort is a TCP port by number (with an optional endPort for
// a range) or by name (a container port name of the destination pod), as
// in NetworkPolicy.
type AuthorizationPort struct {
	Port    intstr.IntOrString `json:"port"`
	EndPort *int32             `json:"endPort,omitempty"`
}

// IdentityRef is exactly one of a ServiceAccount, every ServiceAccount of a
// namespace, or a SPIFFE ID.
type IdentityRef struct {
	ServiceAccount *ServiceAccountRef `json:"serviceAccount,omitempty"`
	Namespace      string             `json:"namespace,omitempty"`
	SPIFFEID       string             `json:"spiffeID,omitempty"`
}

// ServiceAccountRef names a ServiceAccount; Namespace defaults to the
// Authorization's.
type ServiceAccountRef struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
}

// Salvage is what stands for an Authorization that FromUnstructured or
// Compile refused: an object that admits nothing, keeping the podSelector
// (which decides the pods it restricts) when that parses, else selecting
// every pod of its namespace. A mistake restricts, never opens. The agent
// and tunmeshctl both use it, so that they agree.
func Salvage(u *unstructured.Unstructured) *AuthorizationObject {
	obj := &AuthorizationObject{}
	obj.Namespace, obj.Name = u.GetNamespace(), u.GetName()
	if sel, found, _ := unstructured.NestedMap(u.Object, "spec", "podSelector"); found {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(sel, &obj.Spec.PodSelector); err != nil {
			obj.Spec.PodSelector = metav1.LabelSelector{} // unreadable: every pod of the namespace
		}
	}
	return obj
}

// FromUnstructured converts what a dynamic informer delivers. Unknown
// fields are an error: the API server prunes them, so seeing one means the
// agent is older than the CRD and would misread the object.
func FromUnstructured(u *unstructured.Unstructured) (*AuthorizationObject, error) {
	var o AuthorizationObject
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &o, true); err != nil {
		return nil, fmt.Errorf("%w %s/%s: %w", ErrInvalidAuthorization, u.GetNamespace(), u.GetName(), err)
	}
	return &o, nil
}

// Authorization is a compiled Authorization: immutable, safe for
// concurrent use.
type Authorization struct {
	namespace, name, id string
	selector            labels.Selector
	ports               []authzPort // empty: every port
	from                []identityMatch
	// invalid: the object could not be used as written. It still selects
	// pods (every pod of its namespace when the selector itself is bad) and
	// admits nothing, so a typo restricts rather than opens.
	invalid bool
}

type authzPort struct {
	lo, hi int32
	name   string
}

type identityMatch struct {
	// Exactly one is set.
	sa        *spiffe.ID // namespace + ServiceAccount (trust domain checked by the caller)
	namespace string
	spiffe    *spiffe.ID
}

// String is "namespace/name".
func (a *Authorization) String() string { return a.id }

// Invalid reports whether the object was unusable (it then admits nothing).
func (a *Authorization) Invalid() bool { return a.invalid }

// Compile validates o again (the agent may meet objects the CRD schema of
// another version let through) and compiles it. It always returns a usable
// Authorization; with an error (wrapping ErrInvalidAuthorization) that
// Authorization admits nothing.
func Compile(o *AuthorizationObject) (*Authorization, error) {
	a := &Authorization{namespace: o.Namespace, name: o.Name, id: o.Namespace + "/" + o.Name}
	var errs []error
	fail := func(path string, err error) {
		errs = append(errs, fmt.Errorf("%w %s: %s: %w", ErrInvalidAuthorization, a.id, path, err))
	}
	sel, err := metav1.LabelSelectorAsSelector(&o.Spec.PodSelector)
	if err != nil {
		fail("spec.podSelector", err)
		sel = labels.Everything()
	}
	a.selector = sel
	for i, p := range o.Spec.Ports {
		path := fmt.Sprintf("spec.ports[%d]", i)
		switch {
		case p.Port.Type == intstr.String:
			if es := validation.IsValidPortName(p.Port.StrVal); len(es) > 0 {
				fail(path, fmt.Errorf("port name %q: %s", p.Port.StrVal, strings.Join(es, "; ")))
			} else if p.EndPort != nil {
				fail(path, errors.New("endPort with a named port"))
			}
			a.ports = append(a.ports, authzPort{name: p.Port.StrVal})
		default:
			lo, hi := p.Port.IntVal, p.Port.IntVal
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if lo < 1 || lo > 65535 || hi < lo || hi > 65535 {
				fail(path, fmt.Errorf("port range %d-%d", lo, hi))
			}
			a.ports = append(a.ports, authzPort{lo: lo, hi: hi})
		}
	}
	if len(o.Spec.From) == 0 {
		fail("spec.from", errors.New("no identity listed (at least one is required)"))
	}
	for i, f := range o.Spec.From {
		path := fmt.Sprintf("spec.from[%d]", i)
		n := 0
		var m identityMatch
		if f.ServiceAccount != nil {
			n++
			ns := f.ServiceAccount.Namespace
			if ns == "" {
				ns = o.Namespace
			}
			id := spiffe.ID{TrustDomain: "x", Namespace: ns, ServiceAccount: f.ServiceAccount.Name}
			if err := id.Validate(); err != nil {
				fail(path+".serviceAccount", err)
			}
			m.sa = &id
		}
		if f.Namespace != "" {
			n++
			if es := validation.IsDNS1123Label(f.Namespace); len(es) > 0 {
				fail(path+".namespace", fmt.Errorf("namespace %q: %s", f.Namespace, strings.Join(es, "; ")))
			}
			m.namespace = f.Namespace
		}
		if f.SPIFFEID != "" {
			n++
			id, err := spiffe.Parse(f.SPIFFEID)
			if err != nil {
				fail(path+".spiffeID", err)
			}
			m.spiffe = &id
		}
		if n != 1 {
			fail(path, fmt.Errorf("set exactly one of serviceAccount, namespace, spiffeID (%d set)", n))
			continue
		}
		a.from = append(a.from, m)
	}
	if len(errs) > 0 {
		a.invalid = true
		a.from, a.ports = nil, nil
	}
	return a, errors.Join(errs...)
}

// Selects reports whether the Authorization applies to a pod of its
// namespace with these labels.
func (a *Authorization) Selects(podLabels map[string]string) bool {
	return a.selector.Matches(labels.Set(podLabels))
}

// admitsPort reports whether port (TCP) of the destination pod, whose
// container ports are given, is covered.
func (a *Authorization) admitsPort(port int32, containerPorts []corev1.ContainerPort) bool {
	if a.invalid {
		return false
	}
	if len(a.ports) == 0 {
		return true
	}
	for _, p := range a.ports {
		if p.name == "" {
			if p.lo <= port && port <= p.hi {
				return true
			}
			continue
		}
		if slices.ContainsFunc(containerPorts, func(cp corev1.ContainerPort) bool {
			return cp.Name == p.name && cp.ContainerPort == port && (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP)
		}) {
			return true
		}
	}
	return false
}

// admitsIdentity reports whether the client identity id (of the agent's
// trust domain td) is listed.
func (a *Authorization) admitsIdentity(id spiffe.ID, td string) bool {
	for _, m := range a.from {
		switch {
		case m.sa != nil:
			if id.TrustDomain == td && id.Namespace == m.sa.Namespace && id.ServiceAccount == m.sa.ServiceAccount {
				return true
			}
		case m.namespace != "":
			if id.TrustDomain == td && id.Namespace == m.namespace {
				return true
			}
		case m.spiffe != nil:
			if id == *m.spiffe {
				return true
			}
		}
	}
	return false
}
