package wireguard

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
)

// PersistentKeepalive keeps NAT mappings and the peers' view of each other
// fresh (seconds). Nodes normally reach each other directly; the cost is a
// 32-byte datagram per peer every 25 s.
const PersistentKeepalive = 25

// Configurer applies wireguard-go UAPI configuration (device.Device).
type Configurer interface {
	IpcSet(uapiConf string) error
}

// Route is how a node is reached for the mesh tunnel.
type Route int

const (
	// RouteUnderlay: the node publishes no key (no WireGuard agent there
	// yet, or not a node we know): reached on its node address, as with
	// transport tcp. The tunnel is mTLS all the same.
	RouteUnderlay Route = iota
	// RouteOverlay: through WireGuard to the node's overlay address.
	RouteOverlay
	// RouteRefused: the node claims WireGuard but its annotations are not
	// usable; it is reached neither way (fail closed).
	RouteRefused
)

func (r Route) String() string {
	return [...]string{"underlay", "overlay", "refused"}[r]
}

// Peers is the peer table, fed by a Node informer (Update, Delete) and
// applied to the device. Lookups are safe from any goroutine.
type Peers struct {
	self       string
	encryptAll bool
	dev        Configurer
	log        *slog.Logger
	onChange   func(local []netip.Prefix, routed, held []Peer) // may be nil

	mu sync.RWMutex // guards the fields below
	// nodes is every node by name, self included.
	nodes map[string]Peer
	// configured is what the device has, by node name.
	configured map[string]Peer
	byIP       map[netip.Addr]string
	byOverlay  map[netip.Addr]string
	// dirty are the nodes whose last configuration the device refused.
	dirty map[string]bool
	// podNetworks are the cluster's pod (and service) networks: peers'
	// pod CIDRs must lie inside (unchecked when empty). Set before use.
	podNetworks []netip.Prefix
	// required (strict mode, after a rollout): a node that publishes no
	// key is refused and its pod CIDRs held, never reached in clear.
	// Set before use.
	required bool
	// lastLocal, lastRouted and lastHeld are what onChange was last given.
	lastLocal            []netip.Prefix
	lastRouted, lastHeld []Peer
	notified             bool
}

// NewPeers makes an empty table for the node named self. onChange, if not
// nil, is called (serialized, without the lock held) after every change
// with this node's pod CIDRs, the configured peers (routed into
// WireGuard) and the peers that claim WireGuard but are not configured
// (refused, or their configuration failed: held, never reached in clear).
func NewPeers(self string, encryptAll bool, dev Configurer, onChange func(local []netip.Prefix, routed, held []Peer), log *slog.Logger) *Peers {
	return &Peers{
		self: self, encryptAll: encryptAll, dev: dev, log: log, onChange: onChange,
		nodes: map[string]Peer{}, configured: map[string]Peer{},
		byIP: map[netip.Addr]string{}, byOverlay: map[netip.Addr]string{}, dirty: map[string]bool{},
	}
}

// Update takes a Node added or changed.
func (p *Peers) Update(n *corev1.Node) {
	peer, ok := PeerFromNode(n)
	if !ok {
		p.Delete(n.Name)
		return
	}
	p.apply(n.Name, &peer)
}

// Delete takes a Node deleted.
func (p *Peers) Delete(name string) { p.apply(name, nil) }

func (p *Peers) apply(name string, peer *Peer) {
	p.mu.Lock()
	old, had := p.nodes[name]
	if had {
		delete(p.nodes, name)
		p.unclaimLocked(name, old)
	}
	if peer != nil {
		if peer.Err == nil && (!peer.PublicKey.IsZero() || p.required) && name != p.self {
			if ok, err := p.checkPodCIDRsLocked(name, peer.PodCIDRs); err != nil {
				peer.Err, peer.PodCIDRs = err, ok
			}
		}
		p.nodes[name] = *peer
		p.claimLocked(name, *peer)
		if name == p.self && p.encryptAll && (!had || !slices.Equal(old.PodCIDRs, peer.PodCIDRs)) &&
			slices.ContainsFunc(peer.PodCIDRs, func(c netip.Prefix) bool { return c.Addr().Is6() }) {
			p.log.Warn("DUAL STACK: encrypt-all carries IPv4 pod traffic only; this node's pods' IPv6 traffic to other nodes is NOT encrypted (mesh tunnels still are)",
				"pod_cidrs", fmt.Sprint(peer.PodCIDRs))
		}
		if peer.Err != nil && (!had || old.Err == nil || old.Err.Error() != peer.Err.Error()) {
			p.log.Warn("wireguard peer refused: its annotations are not usable; not reached until fixed", "node", name, "err", peer.Err)
		}
	}
	p.configureLocked(name, peer)
	var local []netip.Prefix
	var routed, held []Peer
	changed := false
	if p.onChange != nil {
		local, routed, held = p.snapshotLocked()
		changed = !p.notified || !slices.Equal(local, p.lastLocal) || !samePeers(routed, p.lastRouted) || !samePeers(held, p.lastHeld)
		if changed {
			p.notified, p.lastLocal, p.lastRouted, p.lastHeld = true, local, routed, held
		}
	}
	p.mu.Unlock()
	if changed {
		p.onChange(local, routed, held)
	}
}

// configureLocked makes the device's configuration of node name what
// peer (nil: gone) wants. configured changes only when the device took
// the change; a failure marks the node dirty for Retry (until then the
// node is refused by Route, never reached in clear).
func (p *Peers) configureLocked(name string, peer *Peer) {
	var uapi strings.Builder
	prev, wasConfigured := p.configured[name]
	want := peer != nil && name != p.self && peer.Err == nil && !peer.PublicKey.IsZero()
	switch {
	case want && wasConfigured && p.samePeer(prev, *peer):
	case want:
		if wasConfigured && prev.PublicKey != peer.PublicKey {
			fmt.Fprintf(&uapi, "public_key=%s\nremove=true\n", prev.PublicKey.Hex())
		}
		uapi.WriteString(p.peerConf(*peer))
	case wasConfigured:
		fmt.Fprintf(&uapi, "public_key=%s\nremove=true\n", prev.PublicKey.Hex())
	}
	if uapi.Len() == 0 {
		delete(p.dirty, name)
		return
	}
	if err := p.dev.IpcSet(uapi.String()); err != nil {
		p.dirty[name] = true
		p.log.Error("configure wireguard peer; retrying", "node", name, "err", err)
		return
	}
	delete(p.dirty, name)
	if want {
		p.configured[name] = *peer
		p.log.Info("wireguard peer configured", "node", name, "endpoint", peer.Endpoint.String(), "public_key", peer.PublicKey.String())
	} else {
		delete(p.configured, name)
		p.log.Info("wireguard peer removed", "node", name)
	}
}

// Retry applies again the nodes whose configuration the device refused
// (Transport.Run calls it with backoff). It reports how many are still
// dirty.
func (p *Peers) Retry() int {
	p.mu.Lock()
	names := make([]string, 0, len(p.dirty))
	for name := range p.dirty {
		names = append(names, name)
	}
	p.mu.Unlock()
	for _, name := range names {
		p.mu.RLock()
		n, ok := p.nodes[name]
		p.mu.RUnlock()
		if ok {
			p.apply(name, &n)
		} else {
			p.apply(name, nil)
		}
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.dirty)
}

// ErrBadPodCIDR: a peer's pod CIDR is not one this node may route into
// WireGuard or accept from it (the peer is refused).
var ErrBadPodCIDR = errors.New("pod CIDR refused")

// checkPodCIDRsLocked checks a WireGuard peer's pod CIDRs before they go
// into its AllowedIPs and the encrypt-all routes (ahead of the main
// table): each must lie inside the cluster's pod networks (when known),
// not overlap the pod CIDRs of this node or another (not refused) node,
// and hold no node's address. Otherwise a node could claim 0.0.0.0/0 or a
// victim's range to draw its traffic, or inject packets from node
// addresses. It returns the acceptable subset with the error.
func (p *Peers) checkPodCIDRsLocked(name string, cidrs []netip.Prefix) ([]netip.Prefix, error) {
	var ok []netip.Prefix
	var errs []error
	for _, c := range cidrs {
		if err := p.checkPodCIDRLocked(name, c); err != nil {
			errs = append(errs, err)
			continue
		}
		ok = append(ok, c)
	}
	return ok, errors.Join(errs...)
}

func (p *Peers) checkPodCIDRLocked(name string, c netip.Prefix) error {
	if len(p.podNetworks) > 0 && !p.inPodNetworks(c) {
		return fmt.Errorf("%w: %s is outside the cluster's pod networks %v", ErrBadPodCIDR, c, p.podNetworks)
	}
	for other, n := range p.nodes {
		if other == name {
			continue
		}
		if n.NodeIP.IsValid() && c.Contains(n.NodeIP) {
			return fmt.Errorf("%w: %s holds node %s's address %s", ErrBadPodCIDR, c, other, n.NodeIP)
		}
		if n.Err != nil {
			continue // a refused peer owns nothing (its ranges were checked too)
		}
		// Every other node's range counts, keyless ones' too (a peer must
		// not draw their pods' traffic into WireGuard), as long as it is
		// a pod network range at all (an unchecked keyless node's bogus
		// range must not lock everyone out).
		for _, oc := range n.PodCIDRs {
			if len(p.podNetworks) > 0 && !p.inPodNetworks(oc) {
				continue
			}
			if oc.Overlaps(c) {
				return fmt.Errorf("%w: %s overlaps node %s's %s", ErrBadPodCIDR, c, other, oc)
			}
		}
	}
	return nil
}

func (p *Peers) inPodNetworks(c netip.Prefix) bool {
	return slices.ContainsFunc(p.podNetworks, func(n netip.Prefix) bool { return n.Bits() <= c.Bits() && n.Contains(c.Addr()) })
}

// claimLocked records that node name has peer's addresses. Two nodes
// claiming one InternalIP (a reused address whose old Node is not gone
// yet, or a node lying in its status) make that address refused until
// one lets go.
func (p *Peers) claimLocked(name string, peer Peer) {
	if other, ok := p.byIP[peer.NodeIP]; ok && other != name {
		p.log.Warn("two nodes claim one InternalIP: refusing WireGuard to it until one lets go", "ip", peer.NodeIP.String(), "node", name, "other", other)
	}
	p.byIP[peer.NodeIP] = name
	if peer.Overlay.IsValid() {
		p.byOverlay[peer.Overlay] = name
	}
}

// unclaimLocked drops node name's (already removed from nodes) claims on
// old's addresses: only the entries that are still its own, handing them
// to another node that claims the same address, if any.
func (p *Peers) unclaimLocked(name string, old Peer) {
	if p.byIP[old.NodeIP] == name {
		delete(p.byIP, old.NodeIP)
		for other, n := range p.nodes {
			if n.NodeIP == old.NodeIP {
				p.byIP[old.NodeIP] = other
				break
			}
		}
	}
	if old.Overlay.IsValid() && p.byOverlay[old.Overlay] == name {
		delete(p.byOverlay, old.Overlay)
		for other, n := range p.nodes {
			if n.Overlay == old.Overlay {
				p.byOverlay[old.Overlay] = other
				break
			}
		}
	}
}

// contestedLocked reports whether more than one node claims ip.
func (p *Peers) contestedLocked(ip netip.Addr) bool {
	owner := p.byIP[ip]
	for name, n := range p.nodes {
		if name != owner && n.NodeIP == ip {
			return true
		}
	}
	return false
}

func samePeers(a, b []Peer) bool {
	return slices.EqualFunc(a, b, func(x, y Peer) bool { return x.Node == y.Node && slices.Equal(x.PodCIDRs, y.PodCIDRs) })
}

func (p *Peers) samePeer(a, b Peer) bool {
	return a.Published == b.Published && slices.Equal(a.PodCIDRs, b.PodCIDRs)
}

// peerConf is the UAPI block that (re)configures one peer in full.
func (p *Peers) peerConf(peer Peer) string {
	var b strings.Builder
	fmt.Fprintf(&b, "public_key=%s\nreplace_allowed_ips=true\nendpoint=%s\npersistent_keepalive_interval=%d\nallowed_ip=%s\n",
		peer.PublicKey.Hex(), peer.Endpoint, PersistentKeepalive, netip.PrefixFrom(peer.Overlay, 128))
	if p.encryptAll && peer.EncryptAll {
		for _, c := range peer.PodCIDRs {
			fmt.Fprintf(&b, "allowed_ip=%s\n", c)
		}
	}
	return b.String()
}

// snapshotLocked is what onChange gets: every other node that claims
// WireGuard is either routed (configured) or held (not configured:
// refused annotations or a failed configuration), so that its pod CIDRs
// stay blackholed rather than fall through to the main table in clear.
func (p *Peers) snapshotLocked() (local []netip.Prefix, routed, held []Peer) {
	if self, ok := p.nodes[p.self]; ok {
		local = slices.Clone(self.PodCIDRs)
	}
	for name, n := range p.nodes {
		if name == p.self || !n.HasKey() && !p.required {
			continue
		}
		c, ok := p.configured[name]
		switch {
		case !ok || n.Err != nil:
			held = append(held, n)
		case c.EncryptAll:
			routed = append(routed, c)
		case p.required:
			held = append(held, n) // strict: its pods are not reached in clear
		default:
			// A WireGuard node without encrypt-all (a rolling change of
			// the setting): it could not deliver pod packets that came
			// through WireGuard, so pod traffic to it takes the main
			// table, as to a keyless node (docs/wireguard.md).
		}
	}
	sort.Slice(routed, func(i, j int) bool { return routed[i].Node < routed[j].Node })
	sort.Slice(held, func(i, j int) bool { return held[i].Node < held[j].Node })
	return local, routed, held
}

// Route says how to reach the node with address nodeIP, and its overlay
// address for RouteOverlay. This node itself is RouteUnderlay (its own
// tunnels never leave the node).
func (p *Peers) Route(nodeIP netip.Addr) (Route, netip.Addr) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	name, ok := p.byIP[nodeIP.Unmap()]
	if ok && name == p.self {
		return RouteUnderlay, netip.Addr{}
	}
	if !ok {
		if p.required {
			return RouteRefused, netip.Addr{} // not a node we know
		}
		return RouteUnderlay, netip.Addr{}
	}
	n := p.nodes[name]
	if p.contestedLocked(nodeIP.Unmap()) {
		return RouteRefused, netip.Addr{}
	}
	if !n.HasKey() {
		if p.required {
			return RouteRefused, netip.Addr{}
		}
		return RouteUnderlay, netip.Addr{}
	}
	// Overlay only when the device has what the node publishes now (not
	// an older key or address whose update failed).
	if c, ok := p.configured[name]; ok && n.Err == nil && !p.dirty[name] && c.Published == n.Published {
		return RouteOverlay, c.Overlay
	}
	return RouteRefused, netip.Addr{}
}

// NodeOfOverlay is the node address of the configured peer whose overlay
// address is overlay (the address wireguard-go let a tunnel come from).
func (p *Peers) NodeOfOverlay(overlay netip.Addr) (netip.Addr, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	name, ok := p.byOverlay[overlay]
	if !ok {
		return netip.Addr{}, false
	}
	c, ok := p.configured[name]
	if !ok || c.Overlay != overlay {
		return netip.Addr{}, false
	}
	return c.NodeIP, true
}

// Counts are how many nodes the table knows in each state (for metrics).
func (p *Peers) Counts() (configured, refused, underlay int) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	for name, n := range p.nodes {
		switch {
		case name == p.self:
		case !n.HasKey() && p.required:
			refused++
		case !n.HasKey():
			underlay++
		case n.Err != nil:
			refused++
		default:
			if _, ok := p.configured[name]; ok {
				configured++
			}
		}
	}
	return configured, refused, underlay
}

// LocalPodCIDRs are this node's pod CIDRs (from its Node).
func (p *Peers) LocalPodCIDRs() []netip.Prefix {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return slices.Clone(p.nodes[p.self].PodCIDRs)
}
