package dialer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
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
