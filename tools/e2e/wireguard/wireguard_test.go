package wireguard

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/node/wireguard"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

const (
	echoPort    = 9000
	skippedPort = 9300
	dnsPort     = 5353
)

// The pods every test uses: a1 and a2 on node-1, b1 on node-2 (meshed),
// skip on node-2 (meshed, port 9300 skipped: plaintext passthrough), plain
// on node-2 (not meshed).
var (
	setupOnce sync.Once
	pods      map[string]*corev1.Pod
)

func setup(t *testing.T) (*e2eenv.Cluster, map[string]*corev1.Pod) {
	t.Helper()
	c := e2eenv.Need(t)
	setupOnce.Do(func() {
		// The namespace outlives this test: the pods serve every test of
		// the package (the cluster goes with the package's TestMain).
		ns := "wireguard"
		if _, err := c.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create namespace %s: %v", ns, err)
		}
		e2eenv.WaitFor(t, 30*time.Second, "default service account in "+ns, func() error {
			_, err := c.Client.CoreV1().ServiceAccounts(ns).Get(context.Background(), "default", metav1.GetOptions{})
			return err
		})
		pods = c.StartPods(t, ns,
			e2eenv.PodSpec{Name: "a1", Node: "node-1"},
			e2eenv.PodSpec{Name: "a2", Node: "node-1"},
			e2eenv.PodSpec{Name: "b1", Node: "node-2"},
			e2eenv.PodSpec{Name: "skip", Node: "node-2", Annotations: map[string]string{"config.tunmesh.io/skip-inbound-ports": "9300"}},
			e2eenv.PodSpec{Name: "plain", Node: "node-2", Annotations: map[string]string{"tunmesh.io/inject": "disabled"}},
		)
	})
	if pods == nil {
		t.Fatal("set-up failed in an earlier test")
	}
	return c, pods
}

// serving starts the echo and UDP servers of the named pods for one test.
func serving(t *testing.T, c *e2eenv.Cluster, names ...string) {
	for _, n := range names {
		serveEcho(t, c, pods[n], echoPort)
		serveUDP(t, c, pods[n], dnsPort)
	}
}

func addr(p *corev1.Pod, port int) string {
	return net.JoinHostPort(p.Status.PodIP, itoa(port))
}

// TestMeshedTransfersCrossNode: meshed connections between nodes both ways,
// checksums intact, dialled over the overlay.
func TestMeshedTransfersCrossNode(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a1", "b1")
	before := agentMetric(t, c, "node-1", "tunmesh_wireguard_tunnel_dials_total", `route="overlay"`)
	transfer(t, c, p["a1"], addr(p["b1"], echoPort), 8<<20, nil)
	transfer(t, c, p["b1"], addr(p["a1"], echoPort), 8<<20, nil)
	if after := agentMetric(t, c, "node-1", "tunmesh_wireguard_tunnel_dials_total", `route="overlay"`); after <= before {
		// The pool may reuse a connection made by an earlier test; then
		// it was dialled over the overlay before.
		if after == 0 {
			t.Fatalf("node-1 dialled no tunnel over the overlay")
		}
	}
	if n := agentMetric(t, c, "node-1", "tunmesh_wireguard_tunnel_dials_total", `route="underlay"`); n != 0 {
		// Only same-node tunnels may use the node address.
		t.Logf("underlay dials on node-1: %v (same-node tunnels)", n)
	}
}

// TestUDPBetweenNodes: a DNS-like request/response between pods on two
// nodes, both directions, and from a non-meshed pod.
func TestUDPBetweenNodes(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a1", "b1")
	for _, tc := range []struct{ from, to string }{{"a1", "b1"}, {"b1", "a1"}, {"plain", "a1"}} {
		q := []byte("query from " + tc.from)
		got, err := query(c, p[tc.from], addr(p[tc.to], dnsPort), q)
		if err != nil {
			t.Fatal(err)
		}
		if want := append([]byte("answer:"), q...); !bytes.Equal(got, want) {
			t.Fatalf("%s -> %s: answer %q, want %q", tc.from, tc.to, got, want)
		}
	}
	// Datagrams larger than WireGuard's inner MTU (a 1500-byte packet,
	// DF set as Linux does): the agent answers ICMP fragmentation needed,
	// the pods' kernels fragment the retries.
	big := bytes.Repeat([]byte("L"), 1472)
	got, err := query(c, p["a1"], addr(p["b1"], dnsPort), big)
	if err != nil || !bytes.Equal(got, append([]byte("answer:"), big...)) {
		t.Fatalf("large datagram a1 -> b1: %d bytes, %v", len(got), err)
	}
	if n := agentMetric(t, c, "node-1", "tunmesh_wireguard_tun_packets_total", `path="too_big"`); n == 0 {
		t.Errorf("node-1 answered no oversize packet with fragmentation needed")
	}
}

// TestUnderlayCarriesOnlyWireGuard: while pods talk across nodes in every
// way (meshed TCP, a skipped port, UDP, a non-meshed pod), the underlay
// between the two nodes carries WireGuard datagrams only: no TCP (so no
// :4143), no other UDP, and none of the payloads in clear.
func TestUnderlayCarriesOnlyWireGuard(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a1", "b1", "skip", "plain")
	serveEcho(t, c, p["skip"], skippedPort)
	markers := map[string][]byte{
		"meshed":  []byte("MESHED-PAYLOAD-7f3a"),
		"skipped": []byte("SKIPPED-PORT-PAYLOAD-91c2"),
		"udp":     []byte("UDP-PAYLOAD-5e0d"),
		"plain":   []byte("NON-MESHED-PAYLOAD-c4b8"),
	}
	pcap := captureUnderlay(t, c, func() {
		transfer(t, c, p["a1"], addr(p["b1"], echoPort), 256<<10, markers["meshed"])
		// The skipped port and the non-meshed pod are pod traffic that
		// encrypt-all carries: it must go through the host TUN both ways.
		hostPath(t, c, "skipped port a1 -> skip", func() {
			transfer(t, c, p["a1"], addr(p["skip"], skippedPort), 256<<10, markers["skipped"])
		})
		hostPath(t, c, "non-meshed plain -> a1", func() {
			transfer(t, c, p["plain"], addr(p["a1"], echoPort), 256<<10, markers["plain"])
		})
		for _, from := range []string{"a1", "plain"} {
			if _, err := query(c, p[from], addr(p["b1"], dnsPort), markers["udp"]); err != nil {
				t.Errorf("%s -> b1: %v", from, err)
			}
			if _, err := query(c, p["b1"], addr(p[from], dnsPort), markers["udp"]); err != nil {
				t.Errorf("b1 -> %s: %v", from, err)
			}
		}
	})
	onlyWireGuard(t, pcap, markers, "icmp")
}

// hostPath runs fn (traffic between a pod of node-1 and one of node-2
// that is not a mesh tunnel) and checks that encrypt-all carried it:
// packets from the host into WireGuard and out of it to the host grow on
// both nodes.
func hostPath(t *testing.T, c *e2eenv.Cluster, what string, fn func()) {
	t.Helper()
	type key struct{ node, path string }
	before := map[key]float64{}
	for _, n := range []string{"node-1", "node-2"} {
		for _, path := range []string{"from_host", "to_host"} {
			before[key{n, path}] = agentMetric(t, c, n, "tunmesh_wireguard_tun_packets_total", `path="`+path+`"`)
		}
	}
	fn()
	for k, v := range before {
		if after := agentMetric(t, c, k.node, "tunmesh_wireguard_tun_packets_total", `path="`+k.path+`"`); after <= v {
			t.Errorf("%s: %s's %s packets did not grow (%v -> %v): not carried by encrypt-all", what, k.node, k.path, v, after)
		}
	}
}

// onlyWireGuard checks a capture of the underlay: WireGuard datagrams
// only, ICMP only as icmpFilter selects, none of the markers in clear.
func onlyWireGuard(t *testing.T, pcap string, markers map[string][]byte, icmpFilter string) {
	t.Helper()
	for _, f := range []struct{ filter, what string }{
		{"tcp", "TCP (mesh tunnels on :4143 or a skipped port in clear)"},
		{"udp && !(udp.port==51820)", "UDP other than WireGuard"},
		{icmpFilter, "ICMP"},
	} {
		if n := countFrames(t, pcap, f.filter); n != 0 {
			out, _ := exec.Command("tshark", "-r", pcap, "-Y", f.filter).Output()
			t.Errorf("the underlay between the nodes carried %d frames of %s:\n%s", n, f.what, out)
		}
	}
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	for what, m := range markers {
		if bytes.Contains(raw, m) {
			t.Errorf("the %s payload crossed the underlay in clear", what)
		}
	}
	t.Logf("underlay: %d WireGuard frames, nothing else", countFrames(t, pcap, "udp.port==51820"))
}

// TestRestartNeverInClear: while node-1's agent restarts, pods of node-1
// keep sending UDP to a pod of node-2 (and a non-meshed pod of node-2 to
// one of node-1): nothing crosses the underlay in clear (the encrypt-all
// rule and blackholes stay while no agent, or a not yet synced one, serves
// the node).
func TestRestartNeverInClear(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a1", "b1")
	markers := map[string][]byte{"udp-a1": []byte("RESTART-UDP-a1-2b7e"), "udp-plain": []byte("RESTART-UDP-plain-6d1f")}
	pcap := captureUnderlay(t, c, func() {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for from, m := range map[string][]byte{"a1": markers["udp-a1"], "plain": markers["udp-plain"]} {
			to := "b1"
			if from == "plain" {
				to = "a1"
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					// Errors expected while the agent restarts: dropped,
					// never sent in clear.
					_, _ = query(c, p[from], addr(p[to], dnsPort), m)
				}
			}()
		}
		// And a fire-and-forget stream (a datagram every half
		// millisecond) from a1, so that even a short window between the
		// new agent's start and its informer sync would put a clear
		// packet on the wire.
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			conn, err := namedns.DialContext(ctx, c.PodNetns(p["a1"]), "udp", addr(p["b1"], dnsPort))
			cancel()
			if err != nil {
				t.Errorf("blaster: %v", err)
				return
			}
			defer conn.Close()
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, _ = conn.Write(markers["udp-a1"]) // errors (a blackhole) expected while restarting
				time.Sleep(500 * time.Microsecond)
			}
		}()
		time.Sleep(time.Second)
		restartAgent(t, c, "node-1")
		time.Sleep(2 * time.Second)
		close(stop)
		wg.Wait()
	})
	// While node-1 has no agent, its kernel answers WireGuard datagrams
	// with port unreachable (node address to node address, quoting the
	// encrypted datagram's start): not pod traffic.
	onlyWireGuard(t, pcap, markers, "icmp && !(icmp.type==3 && icmp.code==3 && udp.dstport==51820)")
	e2eenv.WaitFor(t, 30*time.Second, "a1 -> b1 UDP after node-1's agent restarted", func() error {
		_, err := query(c, p["a1"], addr(p["b1"], dnsPort), []byte("after restart"))
		return err
	})
}

// TestSameNodeUnaffected: pods of one node talk as before (meshed TCP and
// UDP); their packets never reach WireGuard.
func TestSameNodeUnaffected(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a2")
	before := agentMetric(t, c, "node-1", "tunmesh_wireguard_tun_packets_total", `path="from_host"`)
	transfer(t, c, p["a1"], addr(p["a2"], echoPort), 4<<20, nil)
	q := []byte("same node")
	if got, err := query(c, p["a1"], addr(p["a2"], dnsPort), q); err != nil || !bytes.Equal(got, append([]byte("answer:"), q...)) {
		t.Fatalf("same-node UDP: %q %v", got, err)
	}
	if after := agentMetric(t, c, "node-1", "tunmesh_wireguard_tun_packets_total", `path="from_host"`); after != before {
		t.Fatalf("same-node traffic went to WireGuard: from_host %v -> %v", before, after)
	}
}

// TestGarbageDatagramDropped: datagrams to the WireGuard port that are not
// WireGuard messages are dropped and counted; the tunnel keeps working.
func TestGarbageDatagramDropped(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "b1")
	ip2, _ := node(c, "node-2")
	_, netns1 := node(c, "node-1")
	before := agentMetric(t, c, "node-2", "tunmesh_wireguard_dropped_datagrams_total", `reason="malformed"`)
	if err := namedns.Do(netns1, func() error {
		u, err := net.Dial("udp", net.JoinHostPort(ip2, "51820"))
		if err != nil {
			return err
		}
		defer u.Close()
		_, err = u.Write([]byte("GET / HTTP/1.1\r\nHost: not-wireguard\r\n\r\n"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 10*time.Second, "garbage datagram counted on node-2", func() error {
		if n := agentMetric(t, c, "node-2", "tunmesh_wireguard_dropped_datagrams_total", `reason="malformed"`); n != before+1 {
			return errorf("malformed %v, want %v", n, before+1)
		}
		return nil
	})
	transfer(t, c, p["a1"], addr(p["b1"], echoPort), 1<<20, nil)
}

// TestAgentRestartKeepsKey: a restarted agent keeps its key (the Node's
// annotation is unchanged) and the other node reconnects to it.
func TestAgentRestartKeepsKey(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "b1")
	key := nodeKey(t, c, "node-2")
	restartAgent(t, c, "node-2")
	if got := nodeKey(t, c, "node-2"); got != key {
		t.Fatalf("key changed across a restart: %s -> %s", key, got)
	}
	e2eenv.WaitFor(t, 30*time.Second, "a1 -> b1 after node-2's agent restarted", func() error {
		return tryTransfer(c, p["a1"], addr(p["b1"], echoPort), 1<<20, nil, 5*time.Second)
	})
}

// TestKeyRotation: deleting a node's key file and restarting its agent
// rotates the key; the other node picks the new key up from the Node.
func TestKeyRotation(t *testing.T) {
	c, p := setup(t)
	serving(t, c, "a1", "b1")
	key := nodeKey(t, c, "node-2")
	keyFile := filepath.Join(e2eenv.TestRoot, c.Name, "mesh", "node-2", "state", wireguard.KeyFile)
	if err := os.Remove(keyFile); err != nil {
		t.Fatalf("remove the key: %v", err)
	}
	restartAgent(t, c, "node-2")
	newKey := nodeKey(t, c, "node-2")
	if newKey == key {
		t.Fatal("key not rotated")
	}
	e2eenv.WaitFor(t, 30*time.Second, "a1 -> b1 with node-2's new key", func() error {
		return tryTransfer(c, p["a1"], addr(p["b1"], echoPort), 1<<20, nil, 5*time.Second)
	})
	q := []byte("after rotation")
	if _, err := query(c, p["b1"], addr(p["a1"], dnsPort), q); err != nil {
		t.Fatalf("UDP after the rotation: %v", err)
	}
}

func nodeKey(t *testing.T, c *e2eenv.Cluster, name string) string {
	t.Helper()
	n, err := c.Client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	k := n.Annotations[wireguard.AnnotationPublicKey]
	if strings.TrimSpace(k) == "" {
		t.Fatalf("node %s publishes no key", name)
	}
	return k
}
