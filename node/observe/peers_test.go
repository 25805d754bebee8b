package observe

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/pods"
)

// wirePacket is an Ethernet/IPv4/TCP header from src to dst.
func wirePacket(src, dst netip.AddrPort) []byte {
	b := make([]byte, 14+20+20)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:]
	ip[0], ip[9] = 0x45, 6
	copy(ip[12:16], src.Addr().AsSlice())
	copy(ip[16:20], dst.Addr().AsSlice())
	binary.BigEndian.PutUint16(ip[20:], src.Port())
	binary.BigEndian.PutUint16(ip[22:], dst.Port())
	return b
}

// TestWirePeers: the wire side keeps tunnels between this node and the
// nodes the pod's meshed connections go through; with a same-node pair
// (this node is a peer too) it still leaves out this node's tunnels to
// other nodes, and other namespaces' pods' peers.
func TestWirePeers(t *testing.T) {
	self, peer, other := netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("192.168.1.2"), netip.MustParseAddr("192.168.1.3")
	pod := &pods.Pod{Namespace: "shop", Name: "web-1"}
	names := func(a netip.Addr) flowlog.PodRef {
		switch a {
		case netip.MustParseAddr("10.1.0.5"):
			return flowlog.PodRef{Namespace: "shop", Name: "web-1"}
		case netip.MustParseAddr("10.1.0.6"):
			return flowlog.PodRef{Namespace: "bank", Name: "api-1"}
		}
		return flowlog.PodRef{}
	}
	log := flowlog.New(names, nil, flowlog.Options{})
	meshed := func(src string, peer netip.Addr) {
		log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort("10.2.0.9:80"), TLS: flowlog.TLSTrue, Peer: peer})
	}
	meshed("10.1.0.5:4000", peer)  // web-1 to a pod on peer
	meshed("10.1.0.5:4001", self)  // web-1 to a pod on this node
	meshed("10.1.0.6:4000", other) // bank's pod to other
	ps := &peerSet{log: log, pod: pod, local: map[netip.Addr]bool{self: true}}
	ps.update()
	tun := func(a, b netip.Addr) []byte {
		return wirePacket(netip.AddrPortFrom(a, 40000), netip.AddrPortFrom(b, 4143))
	}
	cases := []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"to the pod's peer", tun(self, peer), true},
		{"from the pod's peer", tun(peer, self), true},
		{"same-node tunnel", tun(self, self), true},
		{"this node to another namespace's peer", tun(self, other), false},
		{"another namespace's peer to this node", tun(other, self), false},
	}
	for _, c := range cases {
		if got := ps.keep(c.pkt); got != c.want {
			t.Errorf("%s: keep = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestWireTunnels: when the accounting knows the tunnel connection of the
// pod's meshed connection, only that 4-tuple is kept: another tunnel
// connection between the same two nodes (other identities' pools) is not.
func TestWireTunnels(t *testing.T) {
	self, peer := netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("192.168.1.2")
	mine := [2]netip.AddrPort{netip.AddrPortFrom(self, 40000), netip.AddrPortFrom(peer, 4143)}
	log := flowlog.New(func(a netip.Addr) flowlog.PodRef {
		if a == netip.MustParseAddr("10.1.0.5") {
			return flowlog.PodRef{Namespace: "shop", Name: "web-1"}
		}
		return flowlog.PodRef{}
	}, nil, flowlog.Options{})
	log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.1.0.5:4000"), Dst: netip.MustParseAddrPort("10.2.0.9:80"), TLS: flowlog.TLSTrue, Peer: peer, Tunnel: mine})
	ps := &peerSet{log: log, pod: &pods.Pod{Namespace: "shop", Name: "web-1"}, local: map[netip.Addr]bool{self: true}}
	ps.update()
	cases := []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"the pod's tunnel, out", wirePacket(mine[0], mine[1]), true},
		{"the pod's tunnel, back", wirePacket(mine[1], mine[0]), true},
		{"another tunnel to the same node", wirePacket(netip.AddrPortFrom(self, 40001), mine[1]), false},
		{"the peer's tunnel to this node", wirePacket(netip.AddrPortFrom(peer, 50000), netip.AddrPortFrom(self, 4143)), false},
	}
	for _, c := range cases {
		if got := ps.keep(c.pkt); got != c.want {
			t.Errorf("%s: keep = %v, want %v", c.name, got, c.want)
		}
	}
}
