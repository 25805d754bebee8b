package dialer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// TestDialTCPHook: with DialTCP set (the WireGuard transport) every tunnel
// connection is opened by it, for the target's node and the mesh port, and
// its failure is the dial's: no fallback to a dial of the node address.
func TestDialTCPHook(t *testing.T) {
	client, server := tunneltest.TLSConfigs(t)
	node, port := slowServer(t, server, 0)
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "default"}
	target := Target{SrcID: id, Src: netip.MustParseAddrPort("10.244.1.2:40000"),
		Dst: netip.MustParseAddrPort("10.244.2.3:8080"), DstID: id, DstNode: node}
	refused := errors.New("peer refused")
	for _, tc := range []struct {
		name string
		fail bool
	}{{"hook dials", false}, {"hook fails", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var calls []string
			d := &Dialer{Certs: testCerts{client}, MeshPort: port, ControlNamespace: "tunmesh", Timeout: 2 * time.Second, DisableV3: true,
				DialTCP: func(ctx context.Context, n netip.Addr, p int) (net.Conn, error) {
					calls = append(calls, net.JoinHostPort(n.String(), strconv.Itoa(p)))
					if tc.fail {
						return nil, refused
					}
					var nd net.Dialer
					return nd.DialContext(ctx, "tcp", net.JoinHostPort(n.String(), strconv.Itoa(p)))
				}}
			conn, err := d.Dial(context.Background(), target)
			if conn != nil {
				conn.Close()
			}
			if want := net.JoinHostPort(node.String(), strconv.Itoa(port)); len(calls) != 1 || calls[0] != want {
				t.Fatalf("hook calls %v, want one for %s", calls, want)
			}
			if tc.fail != errors.Is(err, refused) || (!tc.fail && err != nil) {
				t.Fatalf("Dial err = %v", err)
			}
		})
	}
}

// TestPoolDrainsOnRouteChange: a pooled connection made on one path to a
// node (RouteOf: the underlay) is drained once the node's path changes
// (it switched to WireGuard): the next stream opens a new connection,
// the old one's streams go on, and an unchanged path keeps reusing.
func TestPoolDrainsOnRouteChange(t *testing.T) {
	p := startPeer(t, true)
	d := newTestDialer(t, p)
	d.IdleTimeout = time.Hour
	var route atomic.Value
	route.Store("underlay")
	d.RouteOf = func(n netip.Addr) string {
		if n != p.addr {
			t.Errorf("RouteOf(%s), want the target's node %s", n, p.addr)
		}
		return route.Load().(string)
	}
	old, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, old)
	again, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, again)
	again.Close()
	if got := p.conns.Load(); got != 1 {
		t.Fatalf("same path: %d connections, want 1 (reused)", got)
	}
	route.Store("overlay fd74:6d77:67::7f00:1")
	fresh, err := d.Dial(t.Context(), tgt(p))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, fresh)
	if got := p.conns.Load(); got != 2 {
		t.Fatalf("after the path changed: %d connections, want 2 (the old one drained)", got)
	}
	roundTrip(t, old) // a drained connection's streams go on
	old.Close()
	deadline := time.Now().Add(2 * time.Second)
	for d.Conns() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d pooled connections, want the drained one closed", d.Conns())
		}
		d.reap(time.Hour)
		time.Sleep(10 * time.Millisecond)
	}
	fresh.Close()
}
