package wireguard

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Encrypt-all routing, in the node's namespace (docs/wireguard.md):
//
//	ip rule add from <this node's pod CIDR> lookup 4143 priority 4143
//	table 4143: <peer pod CIDR> dev tmhost metric 0        (to the agent)
//	            blackhole <peer pod CIDR> metric 1000      (fail closed)
//
// Every packet a local pod sends to a pod of a peer node (meshed pods'
// passthrough packets come out of tmhost into the kernel first, non-meshed
// pods' packets come from the primary CNI's bridge) is routed into tmhost,
// which the agent reads and hands to WireGuard. Node-originated traffic
// (source not a pod address) keeps the main table. While no agent serves
// tmhost (restart) the device and its routes are gone and the blackhole
// routes drop the packets instead of letting the main table send them in
// clear; they and the rules are removed when the peer leaves, or by
// Release (uninstall).
//
// A starting agent only adds to what the previous one left until its
// node informer has synced and its own Node (with a pod CIDR) is known:
// before that an empty view means "not known yet", not "no peers", and
// deleting the rule or the blackholes would send cross-node pod traffic
// in clear through the main table (unboundedly, if the API server is
// down). The rule is never deleted because this node's pod CIDRs are
// unknown.
const (
	DefaultRouteTable   = 4143
	DefaultRulePriority = 4143
	blackholeMetric     = 1000
)

type routes struct {
	table, prio int
	nsPath      string // the node's network namespace
	log         *slog.Logger

	mu       sync.Mutex // guards the fields below
	h        *netlink.Handle
	hErr     error
	hostLink int // ifindex of the host TUN; 0 until attached
	local    []netip.Prefix
	peerNets []netip.Prefix // routed into the host TUN (blackholed too)
	holdNets []netip.Prefix // only blackholed (refused peers)
	// synced: the view is complete (node informer synced); until then
	// reconcile only adds.
	synced bool
}

func newRoutes(table, prio int, nsPath string, log *slog.Logger) *routes {
	return &routes{table: table, prio: prio, nsPath: nsPath, log: log}
}

// open makes the netlink handle in the node's namespace (once).
func (r *routes) openLocked(nsPath string) error {
	if r.h != nil || r.hErr != nil {
		return r.hErr
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		r.hErr = fmt.Errorf("open netns %q: %w", nsPath, err)
		return r.hErr
	}
	defer ns.Close()
	r.h, r.hErr = netlink.NewHandleAt(ns)
	if r.hErr != nil {
		r.hErr = fmt.Errorf("netlink handle in %q: %w", nsPath, r.hErr)
	}
	return r.hErr
}

// attach records the host TUN's ifindex and reconciles.
func (r *routes) attach(ifindex int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hostLink = ifindex
	r.reconcileLocked()
}

// sync takes this node's pod CIDRs and the peers (Peers' onChange):
// the pod CIDRs of routed peers go into the host TUN, those of held
// peers (refused: they claim WireGuard but cannot be configured) are
// only blackholed.
func (r *routes) sync(local []netip.Prefix, routed, held []Peer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.local, r.peerNets, r.holdNets = v4(local), nil, nil
	for _, p := range routed {
		r.peerNets = append(r.peerNets, v4(p.PodCIDRs)...)
	}
	for _, p := range held {
		r.holdNets = append(r.holdNets, v4(p.PodCIDRs)...)
	}
	r.reconcileLocked()
}

// markSynced says the view given to sync is now complete (the node
// informer has synced): from now on what it lacks is deleted.
func (r *routes) markSynced() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.synced = true
	r.reconcileLocked()
}

func v4(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, c := range ps {
		if c.Addr().Is4() {
			out = append(out, c)
		}
	}
	return out
}

func (r *routes) reconcileLocked() {
	if err := r.openLocked(r.nsPath); err != nil {
		r.log.Error("encrypt-all routes", "err", err)
		return
	}
	// Prune only with a complete view that knows this node's pod CIDRs.
	prune := r.synced && len(r.local) > 0
	if err := reconcile(r.h, r.table, r.prio, r.hostLink, r.local, r.peerNets, r.holdNets, prune); err != nil {
		r.log.Error("encrypt-all routes", "err", err)
	}
}

// close leaves the rules and blackhole routes for the next agent (the
// host TUN's routes go with the device).
func (r *routes) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h != nil {
		r.h.Close()
		r.h = nil
	}
}

// release removes every rule and route of the table: the node's pods then
// talk to other nodes on the primary CNI's path (uninstall).
func (r *routes) release() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.openLocked(r.nsPath); err != nil {
		return err
	}
	return reconcile(r.h, r.table, r.prio, 0, nil, nil, nil, true)
}

// reconcile adds the rules for local and the routes of table for
// peerNets (dev hostLink when non-zero, blackholes always) and holdNets
// (blackholes only). With prune it also deletes what else the table
// holds; without, it deletes nothing.
func reconcile(h *netlink.Handle, table, prio, hostLink int, local, peerNets, holdNets []netip.Prefix, prune bool) error {
	var errs []error
	// Rules.
	rules, err := h.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("list rules of table %d: %w", table, err)
	}
	want := map[netip.Prefix]bool{}
	for _, l := range local {
		want[l] = true
	}
	for _, ru := range rules {
		src := prefixOf(ru.Src)
		if want[src] && ru.Priority == prio && ru.Dst == nil {
			delete(want, src)
			continue
		}
		if !prune {
			continue
		}
		ru := ru
		if err := h.RuleDel(&ru); err != nil {
			errs = append(errs, fmt.Errorf("delete rule %v: %w", ru, err))
		}
	}
	for l := range want {
		ru := netlink.NewRule()
		ru.Family, ru.Table, ru.Priority, ru.Src = netlink.FAMILY_V4, table, prio, ipNet(l)
		if err := h.RuleAdd(ru); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add rule from %s lookup %d: %w", l, table, err))
		}
	}
	// Routes.
	type key struct {
		dst       netip.Prefix
		blackhole bool
	}
	wantR := map[key]bool{}
	for _, c := range peerNets {
		wantR[key{c, true}] = true
		if hostLink != 0 {
			wantR[key{c, false}] = true
		}
	}
	for _, c := range holdNets {
		wantR[key{c, true}] = true
	}
	have, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return errors.Join(append(errs, fmt.Errorf("list routes of table %d: %w", table, err))...)
	}
	for _, rt := range have {
		k := key{prefixOf(rt.Dst), rt.Type == unix.RTN_BLACKHOLE}
		ok := wantR[k] && (k.blackhole && rt.Priority == blackholeMetric || !k.blackhole && rt.LinkIndex == hostLink && rt.Priority == 0)
		if ok {
			delete(wantR, k)
			continue
		}
		if !prune {
			continue
		}
		rt := rt
		if err := h.RouteDel(&rt); err != nil {
			errs = append(errs, fmt.Errorf("delete route %v: %w", rt, err))
		}
	}
	for k := range wantR {
		rt := &netlink.Route{Dst: ipNet(k.dst), Table: table}
		if k.blackhole {
			rt.Type, rt.Priority = unix.RTN_BLACKHOLE, blackholeMetric
		} else {
			rt.LinkIndex, rt.Scope = hostLink, netlink.SCOPE_LINK
		}
		if err := h.RouteAdd(rt); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add route %s (blackhole %v) table %d: %w", k.dst, k.blackhole, table, err))
		}
	}
	return errors.Join(errs...)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones).Masked()
}
