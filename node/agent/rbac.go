package agent

import (
	"github.com/tunmesh/tunmesh/identity/rbac"
	"github.com/tunmesh/tunmesh/node/access"
	"github.com/tunmesh/tunmesh/node/release"
)

// RequiredPermissions are the API calls tunmesh-node makes, checked at
// start-up (Run fails naming what is missing): the pod and namespace
// informers (clusterview) and fresh reads on CNI ADD and re-attach
// (pods: Pods().Get, Namespaces().Get); the Service and EndpointSlice
// informers (resolve, which also finds the identity service's endpoints);
// events about pods in any namespace (create, and patch for repeats by
// client-go's correlator). With release on exit daemonset-deleted, also
// its own pod and its DaemonSet in podNamespace (release.Watcher). The
// observability API reviews its callers (access: TokenReview and
// SubjectAccessReview).
func RequiredPermissions(releaseOnExit release.Mode, podNamespace string) []rbac.Permission {
	var extra []rbac.Permission
	if releaseOnExit == release.DaemonSetDeleted {
		extra = release.RequiredPermissions(podNamespace)
	}
	return append([]rbac.Permission{
		{Resource: "pods", Verb: "get"},
		{Resource: "pods", Verb: "list"},
		{Resource: "pods", Verb: "watch"},
		{Resource: "namespaces", Verb: "get"},
		{Resource: "namespaces", Verb: "list"},
		{Resource: "namespaces", Verb: "watch"},
		{Resource: "services", Verb: "list"},
		{Resource: "services", Verb: "watch"},
		{Group: "discovery.k8s.io", Resource: "endpointslices", Verb: "list"},
		{Group: "discovery.k8s.io", Resource: "endpointslices", Verb: "watch"},
		{Resource: "events", Verb: "create"},
		{Resource: "events", Verb: "patch"},
		// NetworkPolicy and Authorization informers (clusterview.Policies).
		{Group: "networking.k8s.io", Resource: "networkpolicies", Verb: "list"},
		{Group: "networking.k8s.io", Resource: "networkpolicies", Verb: "watch"},
		{Group: "policy.tunmesh.io", Resource: "authorizations", Verb: "list"},
		{Group: "policy.tunmesh.io", Resource: "authorizations", Verb: "watch"},
		// WireGuard transport: the Node informer (peers) and the node's
		// own annotations (public key, endpoint, overlay address).
		{Resource: "nodes", Verb: "list"},
		{Resource: "nodes", Verb: "watch"},
		{Resource: "nodes", Verb: "patch"},
	}, append(extra, access.RequiredPermissions()...)...)
}
