package agent

import "github.com/tunmesh/tunmesh/identity/rbac"

// RequiredPermissions are the API calls tunmesh-node makes, checked at
// start-up (Run fails naming what is missing): the pod and namespace
// informers (clusterview) and fresh reads on CNI ADD and re-attach
// (pods: Pods().Get, Namespaces().Get); the Service and EndpointSlice
// informers (resolve, which also finds the identity service's endpoints);
// events about pods in any namespace (create, and patch for repeats by
// client-go's correlator).
func RequiredPermissions() []rbac.Permission {
	return []rbac.Permission{
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
	}
}
