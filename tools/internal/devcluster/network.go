package devcluster

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// The underlay: a bridge in the cluster's own namespace ("<name>-ul") with
// one veth to the control plane and one to each node; inside each node the
// veth end is eth0. Host-gw routes send each node's pod CIDR to that node.
const (
	underlayBridge = "br0"
	nodeIfName     = "eth0"
)

// buildNetwork creates the namespaces and the underlay. It never touches the
// host namespace: links are created inside the underlay namespace with their
// peer placed straight into the target namespace.
func buildNetwork(cfg Config, nodes []NodeSpec) error {
	for _, name := range append([]string{cfg.underlayNS(), cfg.controlPlaneNS()}, nodeNetns(nodes)...) {
		if err := namedns.Create(name); err != nil {
			return err
		}
	}
	ul, err := handleAt(cfg.underlayNS())
	if err != nil {
		return err
	}
	defer ul.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: underlayBridge}}
	if err := ul.LinkAdd(br); err != nil {
		return fmt.Errorf("add underlay bridge: %w", err)
	}
	if err := ul.LinkSetUp(br); err != nil {
		return fmt.Errorf("set underlay bridge up: %w", err)
	}

	// Every host on the underlay routes every node's pod CIDR to that node.
	var routes []route
	for _, n := range nodes {
		routes = append(routes, route{dst: n.PodCIDR, via: n.IP})
	}
	if err := attachHost(ul, br, "v-cp", cfg.controlPlaneNS(), controlPlaneIP, routes); err != nil {
		return err
	}
	for _, n := range nodes {
		var others []route
		for _, r := range routes {
			if r.via != n.IP {
				others = append(others, r)
			}
		}
		if err := attachHost(ul, br, "v-"+n.Name, n.Netns, n.IP, others); err != nil {
			return err
		}
		// Nodes forward between the underlay and their pods.
		if err := namedns.SetSysctl(n.Netns, "net.ipv4.ip_forward", "1"); err != nil {
			return err
		}
	}
	return nil
}

type route struct {
	dst netip.Prefix
	via netip.Addr
}

func nodeNetns(nodes []NodeSpec) []string {
	names := make([]string, len(nodes))
	for i, n := range nodes {
		names[i] = n.Netns
	}
	return names
}

// attachHost wires namespace target to the underlay bridge with address ip
// on its eth0, and adds the given routes there.
func attachHost(ul *netlink.Handle, br *netlink.Bridge, ulName, target string, ip netip.Addr, routes []route) error {
	tns, err := netns.GetFromPath(namedns.Path(target))
	if err != nil {
		return fmt.Errorf("open netns %q: %w", target, err)
	}
	defer tns.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: ulName, MasterIndex: br.Index},
		PeerName:      nodeIfName,
		PeerNamespace: netlink.NsFd(tns),
	}
	if err := ul.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s to %s: %w", ulName, target, err)
	}
	if err := ul.LinkSetUp(veth); err != nil {
		return fmt.Errorf("set %s up: %w", ulName, err)
	}
	h, err := netlink.NewHandleAt(tns)
	if err != nil {
		return fmt.Errorf("netlink handle in %q: %w", target, err)
	}
	defer h.Close()
	eth, err := h.LinkByName(nodeIfName)
	if err != nil {
		return fmt.Errorf("find %s in %q: %w", nodeIfName, target, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(underlayPrefix.Bits(), 32)}}
	if err := h.AddrAdd(eth, addr); err != nil {
		return fmt.Errorf("add %s to %s in %q: %w", ip, nodeIfName, target, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set %s up in %q: %w", nodeIfName, target, err)
	}
	for _, r := range routes {
		rt := &netlink.Route{
			LinkIndex: eth.Attrs().Index,
			Dst:       &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), 32)},
			Gw:        r.via.AsSlice(),
		}
		if err := h.RouteAdd(rt); err != nil {
			return fmt.Errorf("add route %s via %s in %q: %w", r.dst, r.via, target, err)
		}
	}
	return nil
}

func handleAt(name string) (*netlink.Handle, error) {
	n, err := netns.GetFromPath(namedns.Path(name))
	if err != nil {
		return nil, fmt.Errorf("open netns %q: %w", name, err)
	}
	defer n.Close()
	h, err := netlink.NewHandleAt(n)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %q: %w", name, err)
	}
	return h, nil
}
