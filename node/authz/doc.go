// Package authz decides whether a connection between two pods is allowed
// by everything the cluster says about it: the source pod's NetworkPolicy
// egress rules, and the destination pod's NetworkPolicy ingress rules, its
// default inbound policy (config.tunmesh.io/default-inbound-policy and the
// Linkerd spelling) and the Authorization objects (policy.tunmesh.io) that
// select it. The same Engine serves the source agent (Outbound: before a
// meshed flow is accepted from the pod, so a denial looks like a
// NetworkPolicy drop), the destination agent (Inbound: on the client
// certificate's identity and the verified source pod, authoritative), the
// plaintext check on a meshed pod's replies (Plaintext), and `tunmeshctl
// authz` (Explain), so what the command prints is what the agents do.
//
// It is pure: it reads pods, namespaces, compiled NetworkPolicies
// (node/netpol) and compiled Authorizations through small interfaces, and
// makes no API calls. Every layer's verdict is kept in Decision.Steps.
//
// Layers, all of which must allow (docs/policy.md):
//
//  1. NetworkPolicy egress of the source pod (Outbound only).
//  2. NetworkPolicy ingress of the destination pod (source: the verified
//     client pod for meshed flows, the peer address for plaintext).
//  3. Identity: if any Authorization selects the destination pod, a meshed
//     client must be admitted by one whose ports cover the port, and
//     plaintext is refused; otherwise the pod's default inbound policy
//     decides (deny refuses everyone, all-/cluster-authenticated refuse
//     plaintext).
package authz
