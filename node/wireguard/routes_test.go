package wireguard

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// testRoutesNetns makes a fresh named network namespace with a dummy
// "host TUN" link, and returns its path, a handle in it and the link's
// ifindex. Everything goes in t.Cleanup.
func testRoutesNetns(t *testing.T) (string, *netlink.Handle, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	name := fmt.Sprintf("tmwg-rt-%d", os.Getpid())
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	ns, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		t.Fatalf("back to the original netns: %v", serr) // the thread stays locked: it dies with the goroutine
	}
	orig.Close()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	// A veth stands in for the host TUN (dummy links may not be built in).
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tmhost"}, PeerName: "tmhost-peer"}); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName("tmhost")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	return "/var/run/netns/" + name, h, l.Attrs().Index
}

// tableState is the encrypt-all rules ("from <src>") and routes ("<dst>
// dev" or "<dst> blackhole") of the test table, sorted.
func tableState(t *testing.T, h *netlink.Handle) (rules, routes []string) {
	t.Helper()
	rs, err := h.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Table: DefaultRouteTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		rules = append(rules, "from "+prefixOf(r.Src).String())
	}
	rts, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: DefaultRouteTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rts {
		if r.Type == unix.RTN_BLACKHOLE {
			routes = append(routes, prefixOf(r.Dst).String()+" blackhole")
		} else {
			routes = append(routes, prefixOf(r.Dst).String()+" dev")
		}
	}
	sort.Strings(rules)
	sort.Strings(routes)
	return rules, routes
}

func wantTable(t *testing.T, h *netlink.Handle, step string, rules, routes []string) {
	t.Helper()
	gotRules, gotRoutes := tableState(t, h)
	if fmt.Sprint(gotRules) != fmt.Sprint(rules) || fmt.Sprint(gotRoutes) != fmt.Sprint(routes) {
		t.Fatalf("%s: rules %q routes %q; want rules %q routes %q", step, gotRules, gotRoutes, rules, routes)
	}
}

// TestRoutesSurviveRestart: a restarting agent's routes (attach, then
// peers and its own Node in any order, before the informer has synced)
// never remove the rule or the blackholes the previous agent left; only a
// synced view deletes, and only what left; release removes everything.
func TestRoutesSurviveRestart(t *testing.T) {
	nsPath, h, link := testRoutesNetns(t)
	local := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/24")}
	b := Peer{Node: "b", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}}
	c := Peer{Node: "c", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}}
	bad := Peer{Node: "d", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}}

	// Agent 1 runs: rule, routes into the host TUN, blackholes (the
	// refused peer d only blackholed).
	r1 := newRoutes(DefaultRouteTable, DefaultRulePriority, nsPath, discard())
	r1.attach(link)
	r1.sync(local, []Peer{b, c}, []Peer{bad})
	r1.markSynced()
	full := []string{"10.244.1.0/24 blackhole", "10.244.1.0/24 dev", "10.244.2.0/24 blackhole", "10.244.2.0/24 dev", "10.244.3.0/24 blackhole"}
	wantTable(t, h, "agent 1", []string{"from 10.244.0.0/24"}, full)
	r1.close()

	// Agent 2 starts on the same device: nothing is removed until synced.
	r2 := newRoutes(DefaultRouteTable, DefaultRulePriority, nsPath, discard())
	t.Cleanup(r2.close)
	r2.attach(link)
	wantTable(t, h, "agent 2 after attach", []string{"from 10.244.0.0/24"}, full)
	r2.sync(nil, []Peer{b}, nil) // a peer before the node's own Node
	wantTable(t, h, "agent 2, a peer, no local", []string{"from 10.244.0.0/24"}, full)
	r2.sync(local, []Peer{b}, nil)
	wantTable(t, h, "agent 2, partial view", []string{"from 10.244.0.0/24"}, full)
	r2.sync(local, []Peer{b, c}, []Peer{bad})

	// Synced without the own Node's pod CIDRs: still nothing removed.
	r2.sync(nil, []Peer{b}, nil)
	r2.markSynced()
	wantTable(t, h, "agent 2 synced, local unknown", []string{"from 10.244.0.0/24"}, full)

	// Complete view: c left, d is still held.
	r2.sync(local, []Peer{b}, []Peer{bad})
	wantTable(t, h, "agent 2 synced, c left", []string{"from 10.244.0.0/24"},
		[]string{"10.244.1.0/24 blackhole", "10.244.1.0/24 dev", "10.244.3.0/24 blackhole"})

	if err := r2.release(); err != nil {
		t.Fatal(err)
	}
	wantTable(t, h, "released", nil, nil)
}

// TestHoldNodeNetns: the namespace New holds is its calling thread's, not
// whatever /proc/self/ns/net (the thread-group leader's) names, and the
// path keeps naming it after the thread moves on.
func TestHoldNodeNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	other, err := netns.New() // this thread only
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer other.Close()
	path, herr := holdNodeNetns()
	if err := netns.Set(orig); err != nil {
		t.Fatalf("back to the original netns: %v", err) // the thread stays locked and dies with the test goroutine
	}
	runtime.UnlockOSThread()
	if herr != nil {
		t.Fatal(herr)
	}
	held, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if !held.Equal(other) {
		t.Fatalf("held %s, want the calling thread's namespace %s", held, other)
	}
	if self, err := netns.GetFromPath("/proc/self/ns/net"); err == nil {
		defer self.Close()
		if held.Equal(self) {
			t.Fatal("held the thread-group leader's namespace")
		}
	}
}
