// Package netpol evaluates Kubernetes networking.k8s.io/v1 NetworkPolicy for
// one connection attempt, as the agents apply it to meshed flows: the source
// agent checks the source pod's egress policies (Evaluator.Egress), the
// destination agent the destination pod's ingress policies
// (Evaluator.Ingress). A meshed connection reaches its destination pod from
// the local agent through tm0, so the primary CNI's enforcement never sees
// it; this package is how tunmesh keeps NetworkPolicy holding for it.
//
// It is pure: no API calls, no informers, no I/O. Policies are compiled once
// when they change (Compile: selectors converted with
// metav1.LabelSelectorAsSelector, CIDRs parsed, policyTypes defaulted) and
// read through two small interfaces, PolicySource and NamespaceSource;
// Snapshot implements both from plain objects.
//
// # What is evaluated
//
//   - spec.podSelector (empty selects every pod of the policy's namespace);
//     a pod selected by any policy of a type is isolated (default deny) for
//     that type, and the policies of a type are a union: the first matching
//     rule of any of them allows.
//   - policyTypes, explicit or defaulted as the API server does (Ingress
//     always, Egress when spec.egress has rules); rules of a type the policy
//     does not list are ignored.
//   - An empty rule list denies (it only isolates); a rule with no from/to
//     matches every peer; a rule with no ports matches every port.
//   - Peers: podSelector alone (pods of the policy's namespace),
//     namespaceSelector alone (every pod of the selected namespaces; {}
//     selects all namespaces), both together in one peer (selected pods of
//     selected namespaces), ipBlock with except, IPv4 and IPv6. Selectors
//     match pods only; ipBlock matches the peer's IP whether or not it is a
//     pod (as kube-network-policies does). matchExpressions are supported
//     with all operators (In, NotIn, Exists, DoesNotExist).
//   - Ports: by number, ranges with endPort, by name (resolved on the
//     destination pod's container ports with the same protocol and number,
//     in both directions), protocol defaulting to TCP, a port entry without
//     port matching every port of its protocol.
//
// # What is not
//
//   - Only the connection's first packet is judged (a verdict per connection
//     attempt); what happens to established connections when policies change
//     is the caller's decision.
//   - The mesh carries TCP only, but the agents also ask this package about
//     what meshed pods send in plaintext (passed-through TCP, UDP, SCTP,
//     ICMP: egress at the source) and about meshed pods' replies to plaintext
//     clients (ingress); see docs/policy.md for which traffic stays with the
//     primary CNI alone.
//   - AdminNetworkPolicy and BaselineAdminNetworkPolicy are not evaluated.
//   - The special cases the API leaves to implementations are decided as
//     follows: traffic from a pod's own node is not exempted (the agent
//     decides), a pod IP is matched by ipBlock, an unknown namespace matches
//     only an empty namespaceSelector.
//   - Invalid policy parts (which the API server rejects, so only seen with
//     version skew) match nothing and are reported by Compile wrapping
//     ErrInvalidPolicy, for the caller to log and count. An invalid
//     spec.podSelector therefore makes a policy select no pod, as in
//     kube-network-policies.
//
// # Reference
//
// The tests compare the evaluator with SIG Network's kube-network-policies
// (sigs.k8s.io/kube-network-policies v0.8.0, a test-only dependency) on
// generated policies, pods, namespaces and connections, and in the fuzz
// test on every spec that compiles cleanly. Its evaluator is unexported
// (methods of its nfqueue-driven Controller, reachable through the API only
// via Controller.Run, which needs nftables and NFQUEUE), so the test links
// those methods by name (go:linkname) from the real module. The upstream
// Kubernetes e2e NetworkPolicy cases (test/e2e/network/netpol: namespaces
// x/y/z, pods a/b/c, reachability matrices) are restated as table tests and
// checked against both.
package netpol
