// Package podnet sets up a meshed pod's network namespace: the persistent
// TUN device tm0 served by the agent's netstack, and policy routing that
// sends every cluster destination (pod and service CIDRs) into tm0 while
// the node/gateway and off-cluster destinations stay on the primary CNI's
// interface.
//
// Why policy routing: the primary CNI leaves a connected route for the
// pod's own subnet (e.g. 10.244.1.0/24 dev eth0) that would beat a wider
// cluster route via tm0. A rule "to <cluster CIDR> lookup <table>" placed
// before the main table wins regardless; the table's only route is
// "default dev tm0".
package podnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/tun"
)

// Config describes the routing of a meshed pod.
type Config struct {
	// TUN is the device name (default "tm0").
	TUN string
	// MTU of the TUN (default 65520: tm0 ends in our netstack, so a large
	// MTU costs nothing on the wire and makes the stack path fast).
	MTU int
	// Cluster lists the destinations sent into the TUN: the cluster's pod
	// and service CIDRs. Required.
	Cluster []netip.Prefix
	// Bypass lists addresses inside Cluster that stay on the primary
	// interface: the node's gateway on the pod network (kubelet probes come
	// from it) and similar. May be empty.
	Bypass []netip.Addr
	// Table is the routing table holding "default dev <TUN>" (default 4143).
	Table int
	// Priority is the rule priority of the cluster rules (default 4143);
	// bypass rules use Priority-1.
	Priority int
}

func (c *Config) defaults() error {
	if c.TUN == "" {
		c.TUN = "tm0"
	}
	if c.MTU == 0 {
		c.MTU = 65520
	}
	if c.Table == 0 {
		c.Table = 4143
	}
	if c.Priority == 0 {
		c.Priority = 4143
	}
	if len(c.Cluster) == 0 {
		return errors.New("podnet: no cluster CIDRs")
	}
	if c.Priority < 2 {
		return fmt.Errorf("podnet: rule priority %d too low", c.Priority)
	}
	return nil
}

// Setup creates the TUN in the pod's namespace (or adopts the one a
// previous attempt left), routes cluster destinations into it, sets
// rp_filter loose and returns the TUN's fd. On error it removes what it
// made.
func Setup(nsPath string, cfg Config) (fd int, err error) {
	if err := cfg.defaults(); err != nil {
		return -1, err
	}
	fd, err = tun.CreateInNetns(nsPath, cfg.TUN, cfg.MTU)
	if err != nil {
		return -1, fmt.Errorf("create %s in %s: %w", cfg.TUN, nsPath, err)
	}
	defer func() {
		if err != nil {
			unix.Close(fd)
			_ = Teardown(nsPath, cfg)
		}
	}()
	err = ns.WithNetNSPath(nsPath, func(ns.NetNS) error { return routeLocked(cfg) })
	if err != nil {
		return -1, fmt.Errorf("route pod %s: %w", nsPath, err)
	}
	return fd, nil
}

// routeLocked runs on a thread inside the pod's namespace.
func routeLocked(cfg Config) error {
	link, err := netlink.LinkByName(cfg.TUN)
	if err != nil {
		return fmt.Errorf("find %s: %w", cfg.TUN, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", cfg.TUN, err)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !hasFamily(cfg.Cluster, fam) {
			continue
		}
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Table: cfg.Table, Dst: defaultDst(fam), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("route default dev %s table %d: %w", cfg.TUN, cfg.Table, err)
		}
	}
	for _, p := range cfg.Cluster {
		rule := netlink.NewRule()
		rule.Dst = prefixNet(p)
		rule.Table = cfg.Table
		rule.Priority = cfg.Priority
		rule.Family = family(p.Addr())
		if err := addRule(rule); err != nil {
			return fmt.Errorf("rule to %s lookup %d: %w", p, cfg.Table, err)
		}
	}
	for _, a := range cfg.Bypass {
		rule := netlink.NewRule()
		rule.Dst = prefixNet(netip.PrefixFrom(a, a.BitLen()))
		rule.Table = unix.RT_TABLE_MAIN
		rule.Priority = cfg.Priority - 1
		rule.Family = family(a)
		if err := addRule(rule); err != nil {
			return fmt.Errorf("rule to %s lookup main: %w", a, err)
		}
	}
	// Replies to plaintext flows that came in on eth0 leave through tm0
	// (and are passed through by the agent): strict reverse-path
	// filtering would drop the asymmetric traffic.
	for _, dev := range []string{"all", "default", cfg.TUN} {
		p := filepath.Join(tun.SysctlDir, "net/ipv4/conf", dev, "rp_filter")
		if err := os.WriteFile(p, []byte("2"), 0o644); err != nil {
			return fmt.Errorf("set %s: %w", p, err)
		}
	}
	return nil
}

// addRule adds rule unless an identical one exists (ADD may be retried).
func addRule(rule *netlink.Rule) error {
	err := netlink.RuleAdd(rule)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// Check reports whether the pod's namespace still has the TUN up and the
// rule sending each cluster CIDR to the TUN's table.
func Check(nsPath string, cfg Config) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	return ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(cfg.TUN)
		if err != nil {
			return fmt.Errorf("%s missing: %w", cfg.TUN, err)
		}
		if link.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("%s is down", cfg.TUN)
		}
		for _, p := range cfg.Cluster {
			rules, err := netlink.RuleList(family(p.Addr()))
			if err != nil {
				return fmt.Errorf("list rules: %w", err)
			}
			found := false
			for _, r := range rules {
				if r.Table == cfg.Table && r.Dst != nil && r.Dst.String() == p.Masked().String() {
					found = true
				}
			}
			if !found {
				return fmt.Errorf("no rule sending %s to table %d", p, cfg.Table)
			}
		}
		return nil
	})
}

// Teardown removes the TUN (its routes go with it) and the rules. A
// missing namespace or device is not an error: CNI DEL must succeed when
// things are already gone.
func Teardown(nsPath string, cfg Config) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	if _, err := os.Stat(nsPath); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rules, err := netlink.RuleList(fam)
			if err != nil {
				return fmt.Errorf("list rules: %w", err)
			}
			for i := range rules {
				r := rules[i]
				if r.Table == cfg.Table || (r.Priority == cfg.Priority-1 && r.Table == unix.RT_TABLE_MAIN) {
					if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
						return fmt.Errorf("delete rule %v: %w", r, err)
					}
				}
			}
		}
		return nil
	})
	var nsErr ns.NSPathNotExistErr
	if err != nil && !errors.As(err, &nsErr) {
		return err
	}
	return tun.Delete(nsPath, cfg.TUN)
}

func hasFamily(ps []netip.Prefix, fam int) bool {
	for _, p := range ps {
		if family(p.Addr()) == fam {
			return true
		}
	}
	return false
}

func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func defaultDst(fam int) *net.IPNet {
	if fam == netlink.FAMILY_V4 {
		return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	}
	return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
}

func prefixNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
