package mesh

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// TestMeshedTransfer: pod-to-pod TCP through the mesh, cross-node and
// same-node, 1 MiB and 100 MiB with checksums both ways and half-close;
// the server sees the client pod's address; the agents count the tunnel.
func TestMeshedTransfer(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-xfer")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "server-near", SA: "server", Node: "node-1"},
		e2eenv.PodSpec{Name: "server-far", SA: "server", Node: "node-2"},
	)
	clientIP := pods["client"].Status.PodIP
	for _, tc := range []struct{ server, node string }{{"server-far", "node-2"}, {"server-near", "node-1"}} {
		t.Run(tc.server, func(t *testing.T) {
			srv := serve(t, c, pods[tc.server], 9000)
			before := agentMetric(t, c, tc.node, "tunmesh_node_connections_opened_total", `direction="inbound"`)
			dst := net.JoinHostPort(pods[tc.server].Status.PodIP, "9000")
			for _, n := range []int{1 << 20, 100 << 20} {
				start := time.Now()
				sum := transfer(t, c, pods["client"], dst, n, nil)
				t.Logf("%d MiB echoed through the mesh in %s", n>>20, time.Since(start).Round(time.Millisecond))
				e2eenv.WaitFor(t, 10*time.Second, "server saw the transfer", func() error {
					remotes, hashes := srv.seen()
					for i := range hashes {
						if hashes[i] == sum {
							if remotes[i].String() != clientIP {
								return fmt.Errorf("server saw client %s, want the client pod %s", remotes[i], clientIP)
							}
							return nil
						}
					}
					return fmt.Errorf("no connection with the sent checksum yet")
				})
			}
			if after := agentMetric(t, c, tc.node, "tunmesh_node_connections_opened_total", `direction="inbound"`); after < before+2 {
				t.Fatalf("agent on %s counted %v inbound tunnels, want %v: traffic did not take the mesh", tc.node, after, before+2)
			}
		})
	}
}

const marker = "TUNMESH-PLAINTEXT-MARKER-0123456789"

// TestUnderlayCarriesOnlyTLS: meshed bytes never cross the underlay in
// clear; a port skipped on the destination (or the source) is plaintext
// on the wire and still works; an opted-out pod talks to meshed pods.
func TestUnderlayCarriesOnlyTLS(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-wire")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1", Annotations: map[string]string{"config.tunmesh.io/skip-outbound-ports": "9300"}},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2", Annotations: map[string]string{"config.linkerd.io/skip-inbound-ports": "9200"}},
		e2eenv.PodSpec{Name: "outsider", SA: "outsider", Node: "node-1", Annotations: map[string]string{"tunmesh.io/inject": "disabled"}},
	)
	for _, port := range []int{9100, 9200, 9300} {
		serve(t, c, pods["server"], port)
	}
	outsiderSrv := serve(t, c, pods["outsider"], 9400)
	payload := []byte(strings.Repeat(marker, 64))
	server := pods["server"].Status.PodIP

	check := func(t *testing.T, dst string, from string, wantClear bool) {
		_, port, _ := net.SplitHostPort(dst)
		filter := "tcp.dstport == 4143 && tls.app_data" // TLS application data to the mesh port
		if wantClear {
			filter = "tcp.dstport == " + port + " && tcp.len > 0"
		}
		pcap := e2eenv.CaptureUnderlay(t, c, filter, func() { transfer(t, c, pods[from], dst, 0, payload) })
		raw, err := os.ReadFile(pcap)
		if err != nil {
			t.Fatal(err)
		}
		if clear := strings.Contains(string(raw), marker); clear != wantClear {
			t.Fatalf("%s -> %s: marker in clear on the underlay = %v, want %v", from, dst, clear, wantClear)
		}
	}
	t.Run("meshed port is TLS", func(t *testing.T) { check(t, net.JoinHostPort(server, "9100"), "client", false) })
	t.Run("skip-inbound port is plaintext", func(t *testing.T) { check(t, net.JoinHostPort(server, "9200"), "client", true) })
	t.Run("skip-outbound port is plaintext", func(t *testing.T) { check(t, net.JoinHostPort(server, "9300"), "client", true) })
	t.Run("opted-out pod to meshed pod", func(t *testing.T) { check(t, net.JoinHostPort(server, "9100"), "outsider", true) })
	t.Run("meshed pod to opted-out pod", func(t *testing.T) {
		transfer(t, c, pods["client"], net.JoinHostPort(pods["outsider"].Status.PodIP, "9400"), 0, payload)
		e2eenv.WaitFor(t, 5*time.Second, "the opted-out server saw the meshed client", func() error {
			// The server records a connection once its echo is done.
			if remotes, _ := outsiderSrv.seen(); len(remotes) == 0 || remotes[0].String() != pods["client"].Status.PodIP {
				return fmt.Errorf("outsider saw %v", remotes)
			}
			return nil
		})
	})
}
