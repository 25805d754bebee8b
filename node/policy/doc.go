// Package policy derives a pod's mesh policy from annotations: whether the
// pod is meshed at all, and which inbound and outbound TCP ports bypass the
// mesh. It is pure (no API calls, no I/O), so the agent can evaluate it at
// CNI ADD time and again on every pod or namespace update.
//
// # Annotations
//
//	tunmesh.io/inject                      enabled | disabled (default enabled)
//	config.tunmesh.io/skip-inbound-ports   port list, e.g. "25, 8080-8090"
//	config.tunmesh.io/skip-outbound-ports  port list
//	linkerd.io/inject                      enabled | ingress | disabled
//	config.linkerd.io/skip-inbound-ports   port list
//	config.linkerd.io/skip-outbound-ports  port list
//	config.tunmesh.io/default-inbound-policy  all-unauthenticated (default) |
//	                                          cluster-unauthenticated | all-authenticated |
//	                                          cluster-authenticated | deny
//	config.linkerd.io/default-inbound-policy  the same values
//
// The Linkerd names are accepted so that workloads migrate from Linkerd
// without editing manifests; "ingress" is Linkerd's ingress-mode proxy, which
// for tunmesh simply means meshed.
//
// Each setting (inject, skip-inbound, skip-outbound, default-inbound) is resolved on its own
// by taking the first key that is present, in this order:
//
//  1. the pod's tunmesh key
//  2. the pod's Linkerd key
//  3. the namespace's tunmesh key
//  4. the namespace's Linkerd key
//
// So a pod overrides its namespace whichever spelling either uses, and on one
// object the tunmesh key shadows the Linkerd key (the shadowed value is not
// even validated, since it has no effect). A key that is present with an empty
// port list is an explicit "skip nothing" and still overrides the namespace.
//
// hostNetwork pods are never meshed (they have no netns of their own to put a
// TUN in), nor are pods in Config.ExcludedNamespaces; for those no annotation
// is read. A pod that is not meshed has empty skip sets: its peers send it
// plaintext passthrough anyway, so skips would mean nothing.
//
// Port skips are honoured by the agent on the client side of a flow: a
// destination pod's skip-inbound-ports makes the SOURCE pod's agent pass the
// flow through in plaintext, so automatic mTLS never lands on a port the
// destination cannot take it on. See ParsePorts for the list syntax.
//
// # Errors are reported, never fatal
//
// Config.For never fails as a whole. A value it cannot use is replaced by the
// default for that setting — a bad inject value means enabled, a bad port
// list means no ports skipped (it does not fall back to the namespace's
// list), a bad default-inbound-policy means deny (fail closed: a value
// meant to restrict must not open the pod) — and For returns one error per such value next to a Policy that is
// otherwise complete. Each error is an *AnnotationError that wraps
// ErrInvalidAnnotation (and, for port lists, ErrInvalidPorts) and names the
// object, the key and the value. A namespace passed with a name other than the
// pod's namespace is ignored with an error wrapping ErrNamespaceMismatch.
//
// The caller, the node agent, owns reporting: it applies the returned Policy
// as is, records each error as a Warning event on the pod (so the pod's owner
// sees it with kubectl describe) and logs it once with the pod's keys. It must
// not refuse or delay the pod because of these errors. Errors about a
// namespace's annotations are therefore reported on each pod they affect,
// which is where their effect shows.
package policy
