package wireguard

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
)

// Node annotations an agent with transport wireguard publishes on its own
// Node. Peers read them with a Node informer.
const (
	AnnotationPublicKey = "wireguard.tunmesh.io/public-key" // base64 Curve25519 public key
	AnnotationEndpoint  = "wireguard.tunmesh.io/endpoint"   // node-ip:udp-port
	AnnotationOverlay   = "wireguard.tunmesh.io/overlay-ip" // the node's overlay address
	// AnnotationEncryptAll is "true" on nodes whose agent runs
	// encrypt-all: only their pod CIDRs are routed into WireGuard (a node
	// without it has no host TUN to deliver decrypted pod packets).
	AnnotationEncryptAll = "wireguard.tunmesh.io/encrypt-all"
)

// OverlayPrefix holds the overlay addresses: a node's is the prefix with
// its IPv4 node address in the last 32 bits (fd74:6d77:67::10.0.0.2). It is
// a unique local IPv6 prefix that no cluster network routes.
var OverlayPrefix = netip.MustParsePrefix("fd74:6d77:67::/96")

// ErrNoOverlay is returned for node addresses without an overlay address
// (IPv6 node addresses are not supported yet).
var ErrNoOverlay = errors.New("no overlay address for this node address")

// OverlayAddr is the overlay address of a node address.
func OverlayAddr(node netip.Addr) (netip.Addr, error) {
	node = node.Unmap()
	if !node.Is4() {
		return netip.Addr{}, fmt.Errorf("%w: %s", ErrNoOverlay, node)
	}
	b := OverlayPrefix.Addr().As16()
	v4 := node.As4()
	copy(b[12:], v4[:])
	return netip.AddrFrom16(b), nil
}

// NodeOfOverlay is the node address an overlay address was derived from.
func NodeOfOverlay(overlay netip.Addr) (netip.Addr, bool) {
	if !overlay.Is6() || !OverlayPrefix.Contains(overlay) {
		return netip.Addr{}, false
	}
	b := overlay.As16()
	return netip.AddrFrom4([4]byte(b[12:])), true
}

// Published is what a node publishes.
type Published struct {
	PublicKey  Key
	Endpoint   netip.AddrPort
	Overlay    netip.Addr
	EncryptAll bool // the node carries its pods' traffic through WireGuard
}

// Annotations are the Node annotations of p.
func (p Published) Annotations() map[string]string {
	a := map[string]string{
		AnnotationPublicKey: p.PublicKey.String(),
		AnnotationEndpoint:  p.Endpoint.String(),
		AnnotationOverlay:   p.Overlay.String(),
	}
	if p.EncryptAll {
		a[AnnotationEncryptAll] = "true"
	}
	return a
}

// MergePatch is a JSON merge patch that sets p's annotations on a Node
// (and removes the encrypt-all one when p has not).
func (p Published) MergePatch() ([]byte, error) {
	ann := map[string]any{}
	for k, v := range p.Annotations() {
		ann[k] = v
	}
	if !p.EncryptAll {
		ann[AnnotationEncryptAll] = nil
	}
	return json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
}

// ErrNotPublished: the node has no WireGuard annotations (no agent with
// transport wireguard has run there yet).
var ErrNotPublished = errors.New("node publishes no wireguard key")

// ParsePublished reads a node's annotations. It returns ErrNotPublished
// when there is no public key annotation, and an error for annotations
// that are there but wrong (wrong key, endpoint, or an overlay address
// that is not the one of the endpoint's node address: a node cannot claim
// another's overlay address).
func ParsePublished(ann map[string]string) (Published, error) {
	var p Published
	ks, ok := ann[AnnotationPublicKey]
	if !ok {
		return p, ErrNotPublished
	}
	var err error
	if p.PublicKey, err = ParseKey(ks); err != nil {
		return p, fmt.Errorf("annotation %s: %w", AnnotationPublicKey, err)
	}
	if p.Endpoint, err = netip.ParseAddrPort(ann[AnnotationEndpoint]); err != nil {
		return p, fmt.Errorf("annotation %s: %w", AnnotationEndpoint, err)
	}
	if p.Endpoint.Port() == 0 {
		return p, fmt.Errorf("annotation %s %q: port 0", AnnotationEndpoint, ann[AnnotationEndpoint])
	}
	p.Endpoint = netip.AddrPortFrom(p.Endpoint.Addr().Unmap(), p.Endpoint.Port())
	if p.Overlay, err = netip.ParseAddr(ann[AnnotationOverlay]); err != nil {
		return p, fmt.Errorf("annotation %s: %w", AnnotationOverlay, err)
	}
	want, err := OverlayAddr(p.Endpoint.Addr())
	if err != nil {
		return p, fmt.Errorf("annotation %s: %w", AnnotationEndpoint, err)
	}
	if p.Overlay != want {
		return p, fmt.Errorf("annotation %s %s: want %s for endpoint %s", AnnotationOverlay, p.Overlay, want, p.Endpoint)
	}
	p.EncryptAll = ann[AnnotationEncryptAll] == "true"
	return p, nil
}

// Peer is one other node as the transport sees it.
type Peer struct {
	Node     string
	NodeIP   netip.Addr     // the node's InternalIP: what tunnels from it are checked against
	PodCIDRs []netip.Prefix // spec.podCIDRs
	// Published is valid when Key is set (HasKey).
	Published
	// Err is why a node's annotations were refused; such a peer is not
	// configured and, since it claims WireGuard, never reached in clear.
	Err error
}

// HasKey reports whether the peer claims WireGuard (valid or not).
func (p Peer) HasKey() bool { return !p.PublicKey.IsZero() || p.Err != nil }

// PeerFromNode reads a Node. ok is false for nodes the transport ignores
// (no InternalIP). A node whose endpoint address is not its InternalIP is
// refused (Err set): the overlay address is bound to the node's address.
func PeerFromNode(n *corev1.Node) (p Peer, ok bool) {
	p.Node = n.Name
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Unmap().Is4() {
			p.NodeIP = ip.Unmap()
			break
		}
	}
	if !p.NodeIP.IsValid() {
		return p, false
	}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if pfx, err := netip.ParsePrefix(c); err == nil {
			p.PodCIDRs = append(p.PodCIDRs, pfx.Masked())
		}
	}
	pub, err := ParsePublished(n.Annotations)
	switch {
	case errors.Is(err, ErrNotPublished):
	case err != nil:
		p.Err = err
	case pub.Endpoint.Addr() != p.NodeIP:
		p.Err = fmt.Errorf("annotation %s %s: not the node's InternalIP %s", AnnotationEndpoint, pub.Endpoint, p.NodeIP)
	default:
		p.Published = pub
	}
	return p, true
}
