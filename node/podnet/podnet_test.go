package podnet

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/tun"
)

// newPodNS makes a namespace shaped like a pod after the bridge plugin:
// eth0 (one end of a veth pair here; the kernel has no dummy module) with
// 10.244.1.5/24 and a default route via .1.
func newPodNS(t *testing.T) ns.NetNS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and TUN devices")
	}
	pod, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pod.Close(); _ = testutils.UnmountNS(pod) })
	err = pod.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "peer0"}); err != nil {
			return err
		}
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		peer, err := netlink.LinkByName("peer0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 244, 1, 5), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.IPv4(10, 244, 1, 1)})
	})
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

func routeDev(t *testing.T, pod ns.NetNS, dst string) string {
	t.Helper()
	var dev string
	err := pod.Do(func(ns.NetNS) error {
		routes, err := netlink.RouteGet(net.ParseIP(dst))
		if err != nil {
			return err
		}
		l, err := netlink.LinkByIndex(routes[0].LinkIndex)
		if err != nil {
			return err
		}
		dev = l.Attrs().Name
		return nil
	})
	if err != nil {
		t.Fatalf("route get %s: %v", dst, err)
	}
	return dev
}

func TestSetupRoutesClusterIntoTUN(t *testing.T) {
	pod := newPodNS(t)
	cfg := Config{
		Cluster: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/16")},
		Bypass:  []netip.Addr{netip.MustParseAddr("10.244.1.1")},
	}
	fd, err := Setup(pod.Path(), cfg)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModeOffload {
		t.Errorf("tm0 fd in mode %v (%v), want offload", mode, err)
	}
	for dst, want := range map[string]string{
		"10.244.1.7": "tm0",  // same node: beats the connected /24 on eth0
		"10.244.2.9": "tm0",  // other node
		"10.96.0.10": "tm0",  // a ClusterIP
		"10.244.1.1": "eth0", // the node's gateway: probes and their replies
		"192.0.2.1":  "eth0", // off-cluster
	} {
		if got := routeDev(t, pod, dst); got != want {
			t.Errorf("route to %s via %s, want %s", dst, got, want)
		}
	}
	err = pod.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("tm0")
		if err != nil {
			return err
		}
		if l.Attrs().MTU != 65520 || l.Attrs().OperState == netlink.OperDown {
			t.Errorf("tm0: mtu %d, state %v", l.Attrs().MTU, l.Attrs().OperState)
		}
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/rp_filter")
		if err != nil || string(b) != "2\n" {
			t.Errorf("rp_filter all = %q (%v), want 2", b, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	if err := Check(pod.Path(), cfg); err != nil {
		t.Fatalf("Check after Setup: %v", err)
	}
	// A rule removed behind the agent's back is reported.
	err = pod.Do(func(ns.NetNS) error {
		r := netlink.NewRule()
		r.Dst = prefixNet(cfg.Cluster[1])
		r.Table, r.Priority = 4143, 4143
		return netlink.RuleDel(r)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(pod.Path(), cfg); err == nil {
		t.Fatal("Check missed a deleted rule")
	}

	// Setup again once the fd is closed (an agent that restarted, or a
	// retried ADD after a failure) adopts the device and the rules. While
	// an fd is open the TUN is busy: the agent must answer a repeated ADD
	// from its own state instead.
	unix.Close(fd)
	fd2, err := Setup(pod.Path(), cfg)
	if err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if got := routeDev(t, pod, "10.244.2.9"); got != "tm0" {
		t.Errorf("after second Setup, route to 10.244.2.9 via %s", got)
	}
	unix.Close(fd2)
	if err := Teardown(pod.Path(), cfg); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if got := routeDev(t, pod, "10.244.2.9"); got != "eth0" {
		t.Errorf("after teardown, route to 10.244.2.9 via %s, want eth0", got)
	}
	err = pod.Do(func(ns.NetNS) error {
		rules, err := netlink.RuleList(netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range rules {
			if r.Table == 4143 || r.Priority == 4142 {
				t.Errorf("rule left after teardown: %+v", r)
			}
		}
		if _, err := netlink.LinkByName("tm0"); err == nil {
			t.Errorf("tm0 left after teardown")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := Teardown(pod.Path(), cfg); err != nil {
		t.Errorf("second Teardown: %v", err)
	}
}

func TestTeardownAfterNamespaceGone(t *testing.T) {
	if err := Teardown("/run/netns/tunmesh-test-does-not-exist", Config{Cluster: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}); err != nil {
		t.Fatalf("Teardown of a missing namespace: %v", err)
	}
}

func TestSetupRejectsEmptyCluster(t *testing.T) {
	if _, err := Setup("/nonexistent", Config{}); err == nil {
		t.Fatal("Setup without cluster CIDRs succeeded")
	}
}

// TestSetupAdoptsPlainTUN: a tm0 that an agent before offloads made (no
// IFF_VNET_HDR) is adopted by Setup in place, in offload mode, with the
// routing done.
func TestSetupAdoptsPlainTUN(t *testing.T) {
	pod := newPodNS(t)
	old, err := tun.CreateInNetnsMode(pod.Path(), "tm0", 65520, tun.ModePlain)
	if err != nil {
		t.Fatal(err)
	}
	var index int
	indexOf := func() int {
		var idx int
		if err := pod.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("tm0")
			if err == nil {
				idx = l.Attrs().Index
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return idx
	}
	index = indexOf()
	unix.Close(old)

	cfg := Config{Cluster: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}
	fd, err := Setup(pod.Path(), cfg)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	defer unix.Close(fd)
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModeOffload {
		t.Errorf("adopted tm0 fd in mode %v (%v), want offload", mode, err)
	}
	if got := indexOf(); got != index {
		t.Errorf("tm0 re-created (ifindex %d -> %d), want adopted", index, got)
	}
	if got := routeDev(t, pod, "10.244.2.9"); got != "tm0" {
		t.Errorf("route to 10.244.2.9 via %s, want tm0", got)
	}
}
