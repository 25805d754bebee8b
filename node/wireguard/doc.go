// Package wireguard is tunmesh's WireGuard transport between nodes: a
// userspace wireguard-go device per agent whose TUN is served in process
// (a gVisor stack for the overlay address, plus a packet path to the
// node's kernel for pod traffic in encrypt-all mode), never a kernel TUN
// or the kernel module.
//
//	keys.go        the node's private key under the state directory (0600,
//	               created once, rotated by deleting it)
//	annotations.go what a node publishes (public key, endpoint, overlay
//	               address) and parsing it back from a Node (fuzzed)
//	tun.go         the in-process TUN (batched) and its overlay gVisor stack
//	gso.go         cutting the overlay stack's 64 KiB TCP packets into
//	               inner-MTU segments (GSO, in the TUN's Read)
//	gro.go         merging decrypted segments for the overlay stack (gVisor's
//	               GRO, after checking every TCP checksum, in Write)
//	bind.go        the UDP bind: opened in the node's namespace, malformed
//	               datagrams dropped and counted before wireguard-go
//	peers.go       the peer table from a Node informer and its translation
//	               into wireguard-go configuration
//	routes.go      encrypt-all: policy routes for peers' pod CIDRs into the
//	               agent's host TUN
//	transport.go   Transport: wires the above, dials and listens on the
//	               overlay for the mesh tunnels
//
// The overlay address of a node is derived from its node address
// (OverlayPrefix + the IPv4 address), so it needs no allocation and the
// server agent maps an overlay source back to the node it proves: a peer's
// AllowedIPs are its overlay address and (encrypt-all) its pod CIDRs, and
// wireguard-go drops decrypted packets whose source is outside them.
package wireguard
