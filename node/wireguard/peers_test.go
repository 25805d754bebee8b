package wireguard

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// fakeDevice records UAPI configuration.
type fakeDevice struct {
	sets []string
	fail error
}

func (d *fakeDevice) IpcSet(s string) error {
	d.sets = append(d.sets, s)
	return d.fail
}

func (d *fakeDevice) last(t *testing.T) string {
	t.Helper()
	if len(d.sets) == 0 {
		t.Fatal("no configuration applied")
	}
	s := d.sets[len(d.sets)-1]
	d.sets = nil
	return s
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestPeersFollowNodes(t *testing.T) {
	dev := &fakeDevice{}
	var changes, helds [][]Peer
	var local []netip.Prefix
	p := NewPeers("a", true, dev, func(l []netip.Prefix, peers, held []Peer) {
		local = l
		changes = append(changes, peers)
		helds = append(helds, held)
	}, discard())

	pubA := testPublished(t, "10.0.0.1")
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, pubA.Annotations()))
	if len(dev.sets) != 0 {
		t.Fatalf("the node itself was configured as a peer: %q", dev.sets)
	}
	if len(local) != 1 || local[0].String() != "10.244.0.0/24" {
		t.Fatalf("local pod CIDRs %v", local)
	}

	// A node without a key: underlay, nothing configured.
	p.Update(testNode("c", "10.0.0.3", []string{"10.244.2.0/24"}, nil))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.3")); r != RouteUnderlay || len(dev.sets) != 0 {
		t.Fatalf("keyless peer: route %v sets %q", r, dev.sets)
	}

	// Join.
	pubB := testPublished(t, "10.0.0.2")
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	conf := dev.last(t)
	for _, want := range []string{"public_key=" + pubB.PublicKey.Hex(), "replace_allowed_ips=true", "endpoint=10.0.0.2:51820",
		"allowed_ip=" + pubB.Overlay.String() + "/128", "allowed_ip=10.244.1.0/24", "persistent_keepalive_interval=25"} {
		if !strings.Contains(conf, want+"\n") {
			t.Errorf("join: %q lacks %q", conf, want)
		}
	}
	if r, o := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay || o != pubB.Overlay {
		t.Fatalf("route to b: %v %s", r, o)
	}
	if n, ok := p.NodeOfOverlay(pubB.Overlay); !ok || n != netip.MustParseAddr("10.0.0.2") {
		t.Fatalf("overlay -> node: %s %v", n, ok)
	}
	if got := changes[len(changes)-1]; len(got) != 1 || got[0].Node != "b" {
		t.Fatalf("onChange peers %+v", got)
	}

	// The same node again (a status update): no reconfiguration.
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if len(dev.sets) != 0 {
		t.Fatalf("unchanged node reconfigured: %q", dev.sets)
	}

	// Key change: the old key is removed, the new one configured.
	pubB2 := testPublished(t, "10.0.0.2")
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB2.Annotations()))
	conf = dev.last(t)
	if !strings.HasPrefix(conf, "public_key="+pubB.PublicKey.Hex()+"\nremove=true\n") || !strings.Contains(conf, "public_key="+pubB2.PublicKey.Hex()+"\n") {
		t.Fatalf("key change: %q", conf)
	}

	// Address change: new endpoint, new overlay address.
	pubB3 := testPublished(t, "10.0.0.12")
	pubB3.PublicKey = pubB2.PublicKey
	p.Update(testNode("b", "10.0.0.12", []string{"10.244.1.0/24"}, pubB3.Annotations()))
	conf = dev.last(t)
	if strings.Contains(conf, "remove=true") || !strings.Contains(conf, "endpoint=10.0.0.12:51820\n") || !strings.Contains(conf, "allowed_ip="+pubB3.Overlay.String()+"/128\n") {
		t.Fatalf("address change: %q", conf)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteUnderlay {
		t.Fatalf("old address still routed: %v", r)
	}
	if _, ok := p.NodeOfOverlay(pubB.Overlay); ok {
		t.Fatal("old overlay address still maps to a node")
	}

	// Annotations that became unusable: removed, refused (never underlay).
	bad := pubB3.Annotations()
	bad[AnnotationOverlay] = pubA.Overlay.String()
	p.Update(testNode("b", "10.0.0.12", []string{"10.244.1.0/24"}, bad))
	if conf = dev.last(t); conf != "public_key="+pubB3.PublicKey.Hex()+"\nremove=true\n" {
		t.Fatalf("refused peer: %q", conf)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.12")); r != RouteRefused {
		t.Fatalf("refused peer route %v", r)
	}
	if c, r, u := p.Counts(); c != 0 || r != 1 || u != 1 {
		t.Fatalf("counts configured %d refused %d underlay %d", c, r, u)
	}
	// Its pod CIDRs stay held (blackholed), never left to the main table.
	if got, held := changes[len(changes)-1], helds[len(helds)-1]; len(got) != 0 || len(held) != 1 || held[0].Node != "b" ||
		!slices.Equal(held[0].PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}) {
		t.Fatalf("refused peer: onChange routed %+v held %+v", got, held)
	}

	// Leave.
	p.Update(testNode("b", "10.0.0.12", []string{"10.244.1.0/24"}, pubB3.Annotations()))
	dev.last(t)
	p.Delete("b")
	if conf = dev.last(t); conf != "public_key="+pubB3.PublicKey.Hex()+"\nremove=true\n" {
		t.Fatalf("leave: %q", conf)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.12")); r != RouteUnderlay {
		t.Fatalf("left node route %v", r)
	}
	if got, held := changes[len(changes)-1], helds[len(helds)-1]; len(got) != 0 || len(held) != 0 {
		t.Fatalf("onChange after leave: %+v held %+v", got, held)
	}
}

// TestPeersTransportOnly: without encrypt-all a peer's AllowedIPs are its
// overlay address only.
func TestPeersTransportOnly(t *testing.T) {
	dev := &fakeDevice{}
	p := NewPeers("a", false, dev, nil, discard())
	pubB := testPublished(t, "10.0.0.2")
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if conf := dev.last(t); strings.Contains(conf, "10.244.1.0/24") || !strings.Contains(conf, "allowed_ip="+pubB.Overlay.String()+"/128\n") {
		t.Fatalf("transport only: %q", conf)
	}
}

// TestPeersDeviceErrorFailsClosed: a peer the device refused is still not
// reached on the underlay.
func TestPeersDeviceErrorFailsClosed(t *testing.T) {
	dev := &fakeDevice{fail: errors.New("boom")}
	p := NewPeers("a", false, dev, nil, discard())
	p.Update(testNode("b", "10.0.0.2", nil, testPublished(t, "10.0.0.2").Annotations()))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r == RouteUnderlay {
		t.Fatal("a peer with a key fell back to the underlay")
	}
}

// TestPeersEncryptAllNeedsBothEnds: a peer's pod CIDRs go into its
// AllowedIPs and the encrypt-all routes only when it publishes encrypt-all
// too (during a rolling change of the setting, a node without it could not
// deliver pod packets that came through WireGuard); toggling reconfigures.
func TestPeersEncryptAllNeedsBothEnds(t *testing.T) {
	dev := &fakeDevice{}
	var routed, held []Peer
	p := NewPeers("a", true, dev, func(_ []netip.Prefix, r, h []Peer) { routed, held = r, h }, discard())
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, testPublished(t, "10.0.0.1").Annotations()))

	pubB := testPublished(t, "10.0.0.2")
	pubB.EncryptAll = false
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if conf := dev.last(t); strings.Contains(conf, "allowed_ip=10.244.1.0/24") || !strings.Contains(conf, "allowed_ip="+pubB.Overlay.String()+"/128\n") {
		t.Fatalf("peer without encrypt-all: %q", conf)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay {
		t.Fatalf("its mesh tunnels: %v", r)
	}
	if len(routed) != 0 || len(held) != 0 {
		t.Fatalf("peer without encrypt-all routed %+v held %+v", routed, held)
	}

	pubB.EncryptAll = true
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if conf := dev.last(t); !strings.Contains(conf, "allowed_ip=10.244.1.0/24\n") {
		t.Fatalf("peer turned encrypt-all on: %q", conf)
	}
	if len(routed) != 1 || routed[0].Node != "b" || len(held) != 0 {
		t.Fatalf("encrypt-all peer routed %+v held %+v", routed, held)
	}

	pubB.EncryptAll = false
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if conf := dev.last(t); strings.Contains(conf, "allowed_ip=10.244.1.0/24") {
		t.Fatalf("peer turned encrypt-all off: %q", conf)
	}
	if len(routed) != 0 {
		t.Fatalf("peer turned encrypt-all off still routed: %+v", routed)
	}
}

// TestPeersRetryFailedConfiguration: a configuration the device refused
// changes nothing in the table (the peer is refused, not configured) and
// is applied by Retry once the device takes it; a failed removal keeps
// the peer configured (the device still has its key) until it succeeds.
func TestPeersRetryFailedConfiguration(t *testing.T) {
	dev := &fakeDevice{fail: errors.New("boom")}
	var routed, held []Peer
	p := NewPeers("a", true, dev, func(_ []netip.Prefix, r, h []Peer) { routed, held = r, h }, discard())
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, testPublished(t, "10.0.0.1").Annotations()))
	pubB := testPublished(t, "10.0.0.2")
	nodeB := testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations())
	p.Update(nodeB)
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteRefused {
		t.Fatalf("unconfigured peer: route %v", r)
	}
	if c, _, _ := p.Counts(); c != 0 || len(routed) != 0 || len(held) != 1 {
		t.Fatalf("failed configuration: configured %d routed %+v held %+v", c, routed, held)
	}
	// Still failing: the same node again retries (no samePeer shortcut).
	dev.sets = nil
	p.Update(nodeB)
	if len(dev.sets) != 1 {
		t.Fatalf("unchanged node after a failure: %d configurations, want a retry", len(dev.sets))
	}
	if n := p.Retry(); n != 1 {
		t.Fatalf("Retry while the device fails: %d dirty, want 1", n)
	}
	dev.fail = nil
	if n := p.Retry(); n != 0 {
		t.Fatalf("Retry: %d still dirty", n)
	}
	if r, o := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay || o != pubB.Overlay {
		t.Fatalf("after retry: %v %s", r, o)
	}
	if len(routed) != 1 || len(held) != 0 {
		t.Fatalf("after retry routed %+v held %+v", routed, held)
	}

	// A key change the device refuses: refused, not overlay to the old key.
	dev.fail = errors.New("boom")
	pubB2 := testPublished(t, "10.0.0.2")
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB2.Annotations()))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteRefused {
		t.Fatalf("failed key change: route %v", r)
	}
	// A removal the device refuses keeps the peer configured and dirty.
	p.Delete("b")
	if c, _, _ := p.Counts(); c != 0 { // b is no node any more
		t.Fatalf("counts %d", c)
	}
	dev.fail, dev.sets = nil, nil
	if n := p.Retry(); n != 0 {
		t.Fatalf("Retry of the removal: %d dirty", n)
	}
	if conf := dev.last(t); conf != "public_key="+pubB.PublicKey.Hex()+"\nremove=true\n" {
		t.Fatalf("retried removal: %q", conf)
	}
	dev.sets = nil
	if n := p.Retry(); n != 0 || len(dev.sets) != 0 {
		t.Fatalf("nothing left to retry: %d dirty, sets %q", n, dev.sets)
	}
}

// TestPeersReusedNodeIP: a node whose InternalIP another (older) node
// still claims makes that address refused; the old node's deletion
// leaves the new node's entries alone.
func TestPeersReusedNodeIP(t *testing.T) {
	dev := &fakeDevice{}
	p := NewPeers("a", false, dev, nil, discard())
	pubX := testPublished(t, "10.0.0.2")
	p.Update(testNode("x", "10.0.0.2", nil, pubX.Annotations()))
	pubY := testPublished(t, "10.0.0.2")
	p.Update(testNode("y", "10.0.0.2", nil, pubY.Annotations()))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteRefused {
		t.Fatalf("two nodes claim 10.0.0.2: route %v", r)
	}
	p.Delete("x")
	if r, o := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay || o != pubY.Overlay {
		t.Fatalf("after x left: %v %s", r, o)
	}
	if n, ok := p.NodeOfOverlay(pubY.Overlay); !ok || n != netip.MustParseAddr("10.0.0.2") {
		t.Fatalf("y's overlay address: %s %v", n, ok)
	}
	// The other order: y's deletion hands the address back to x.
	p.Update(testNode("x", "10.0.0.2", nil, pubX.Annotations()))
	p.Delete("y")
	if r, o := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay || o != pubX.Overlay {
		t.Fatalf("after y left: %v %s", r, o)
	}
	if name := p.byIP[netip.MustParseAddr("10.0.0.2")]; name != "x" {
		t.Fatalf("10.0.0.2 belongs to %q, want x", name)
	}
}

// TestPeersPodCIDRsChecked: a peer's pod CIDRs reach its AllowedIPs and
// the encrypt-all routes only inside the cluster's pod networks, not
// overlapping this node's, another peer's, or a node address; otherwise
// the peer is refused (only its acceptable ranges are held).
func TestPeersPodCIDRsChecked(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cidrs []string
		held  []string // the refused peer's ranges still blackholed
	}{
		{"everything", []string{"0.0.0.0/0"}, nil},
		{"outside the cluster", []string{"192.168.0.0/24"}, nil},
		{"wider than the cluster", []string{"10.244.0.0/15"}, nil},
		{"this node's", []string{"10.244.0.0/25"}, nil},
		{"another peer's", []string{"10.244.1.0/24"}, nil},
		{"one good one bad", []string{"10.244.3.0/24", "10.244.1.128/25"}, []string{"10.244.3.0/24"}},
		{"a node address", []string{"10.244.9.0/24"}, nil},
		{"a keyless node's", []string{"10.244.7.0/24"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := &fakeDevice{}
			var routed, held []Peer
			p := NewPeers("a", true, dev, func(_ []netip.Prefix, r, h []Peer) { routed, held = r, h }, discard())
			p.podNetworks = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12")}
			p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, testPublished(t, "10.0.0.1").Annotations()))
			p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, testPublished(t, "10.0.0.2").Annotations()))
			p.Update(testNode("k", "10.244.9.7", nil, nil)) // a keyless node whose address is in the cluster range
			p.Update(testNode("l", "10.0.0.7", []string{"10.244.7.0/24"}, nil))
			p.Update(testNode("x", "10.0.0.8", []string{"0.0.0.0/0"}, nil)) // keyless, bogus: locks no one out
			dev.sets = nil

			p.Update(testNode("m", "10.0.0.3", tc.cidrs, testPublished(t, "10.0.0.3").Annotations()))
			if len(dev.sets) != 0 {
				t.Fatalf("refused peer configured: %q", dev.sets)
			}
			if r, _ := p.Route(netip.MustParseAddr("10.0.0.3")); r != RouteRefused {
				t.Fatalf("route %v", r)
			}
			if _, refused, _ := p.Counts(); refused != 1 {
				t.Fatalf("refused count %d", refused)
			}
			if len(routed) != 1 || routed[0].Node != "b" {
				t.Fatalf("routed %+v", routed)
			}
			var got []string
			for _, h := range held {
				for _, c := range h.PodCIDRs {
					got = append(got, c.String())
				}
			}
			if !slices.Equal(got, tc.held) {
				t.Fatalf("held ranges %q, want %q", got, tc.held)
			}
			// The peer whose range it claimed is untouched.
			if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay {
				t.Fatalf("b: %v", r)
			}
		})
	}
}

// TestPeersRequired: in strict mode a node that publishes no key (new, or
// its key annotation deleted) is refused and its pod CIDRs held, as is a
// WireGuard node without encrypt-all; this node itself stays underlay.
func TestPeersRequired(t *testing.T) {
	dev := &fakeDevice{}
	var routed, held []Peer
	p := NewPeers("a", true, dev, func(_ []netip.Prefix, r, h []Peer) { routed, held = r, h }, discard())
	p.required = true
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, nil))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.1")); r != RouteUnderlay {
		t.Fatalf("self: %v", r)
	}
	pubB := testPublished(t, "10.0.0.2")
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	p.Update(testNode("c", "10.0.0.3", []string{"10.244.2.0/24"}, nil))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.3")); r != RouteRefused {
		t.Fatalf("keyless node in strict mode: %v", r)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.99")); r != RouteRefused {
		t.Fatalf("unknown address in strict mode: %v", r)
	}
	if len(routed) != 1 || routed[0].Node != "b" || len(held) != 1 || held[0].Node != "c" {
		t.Fatalf("routed %+v held %+v", routed, held)
	}
	if c, r, u := p.Counts(); c != 1 || r != 1 || u != 0 {
		t.Fatalf("counts configured %d refused %d underlay %d", c, r, u)
	}
	// b's key annotation deleted: refused and held, not downgraded.
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, nil))
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteRefused {
		t.Fatalf("key deleted in strict mode: %v", r)
	}
	if len(routed) != 0 || len(held) != 2 {
		t.Fatalf("after b's key went: routed %+v held %+v", routed, held)
	}
	// A WireGuard node without encrypt-all: held too.
	pubB.EncryptAll = false
	p.Update(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, pubB.Annotations()))
	if len(routed) != 0 || len(held) != 2 {
		t.Fatalf("b without encrypt-all: routed %+v held %+v", routed, held)
	}
	if r, _ := p.Route(netip.MustParseAddr("10.0.0.2")); r != RouteOverlay {
		t.Fatalf("b's mesh tunnels: %v", r)
	}
}

// TestPeersWarnDualStack: with encrypt-all, an IPv6 pod CIDR on this node
// is warned about (its pods' IPv6 traffic is not encrypted), once.
func TestPeersWarnDualStack(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	p := NewPeers("a", true, &fakeDevice{}, nil, log)
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24"}, nil))
	if strings.Contains(logs.String(), "DUAL STACK") {
		t.Fatalf("IPv4 only warned: %s", logs.String())
	}
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24", "fd00:10:244::/64"}, nil))
	p.Update(testNode("a", "10.0.0.1", []string{"10.244.0.0/24", "fd00:10:244::/64"}, nil))
	if n := strings.Count(logs.String(), "DUAL STACK"); n != 1 {
		t.Fatalf("dual stack warned %d times, want once: %s", n, logs.String())
	}
}
