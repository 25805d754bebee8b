package wireguard

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
)

const testMeshPort = 4143

func freeUDPPort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// runningTransport is one node's transport, running until stop.
type runningTransport struct {
	*Transport
	reg  *prometheus.Registry
	stop func()
}

func startTransport(t testing.TB, client kubernetes.Interface, name, ip, stateDir string, port int, mtu ...int) *runningTransport {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := Config{NodeName: name, NodeIP: netip.MustParseAddr(ip), Port: port, StateDir: stateDir, MeshPort: testMeshPort}
	if len(mtu) > 0 {
		cfg.MTU = mtu[0]
	}
	tr, err := New(cfg, client, reg, discard())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tr.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s: Run: %v", name, err)
			}
		})
	}
	t.Cleanup(stop)
	waitFor(t, 10*time.Second, name+" ready", func() bool { return tr.Ready() == nil })
	return &runningTransport{Transport: tr, reg: reg, stop: stop}
}

func waitFor(t testing.TB, max time.Duration, what string, try func() bool) {
	t.Helper()
	deadline := time.Now().Add(max)
	for !try() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echo serves ln: each connection's bytes are sent back; the remote
// addresses seen go to addrs.
func echo(t *testing.T, ln net.Listener, addrs chan<- net.Addr) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			addrs <- c.RemoteAddr()
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// transfer sends n random bytes through the tunnel port of node at dst
// and checks the echo's checksum.
func transfer(t *testing.T, from *runningTransport, local, dst string, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := from.DialTCP(netip.MustParseAddr(local))(ctx, netip.MustParseAddr(dst), testMeshPort)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	data := make([]byte, n)
	rand.Read(data)
	go func() {
		_, _ = c.Write(data)
	}()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatal("echo differs")
	}
}

func requireRoot(t testing.TB) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (the bind opens its socket after entering the node namespace)")
	}
}

// TestTwoNodesOverWireGuard: two transports on loopback, peers from Node
// annotations in a fake API: a tunnel port reached through the overlay
// (the server sees the client's node address), garbage datagrams counted,
// a restart keeps the key, a rotated key is picked up by the other node.
func TestTwoNodesOverWireGuard(t *testing.T) {
	requireRoot(t)
	client := fake.NewClientset(
		testNode("a", "127.0.0.1", []string{"10.244.0.0/24"}, nil),
		testNode("b", "127.0.0.2", []string{"10.244.1.0/24"}, nil),
	)
	dirA, dirB := t.TempDir(), t.TempDir()
	portA, portB := freeUDPPort(t), freeUDPPort(t)
	a := startTransport(t, client, "a", "127.0.0.1", dirA, portA)
	b := startTransport(t, client, "b", "127.0.0.2", dirB, portB)

	// Each publishes its annotations on its Node.
	nb, err := client.CoreV1().Nodes().Get(context.Background(), "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p, err := ParsePublished(nb.Annotations); err != nil || p != b.Published() {
		t.Fatalf("b's annotations %v: %v", nb.Annotations, err)
	}
	waitFor(t, 5*time.Second, "a configures b", func() bool { r, _ := a.peers.Route(netip.MustParseAddr("127.0.0.2")); return r == RouteOverlay })

	addrs := make(chan net.Addr, 16)
	ln, err := b.ListenOverlay()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	echo(t, ln, addrs)
	transfer(t, a, "127.0.0.1", "127.0.0.2", 4<<20)
	if got := (<-addrs).(*net.TCPAddr).AddrPort().Addr(); got != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("server saw the tunnel come from %s, want a's node address", got)
	}
	if v := counter(a.metrics.dials.WithLabelValues("overlay")); v != 1 {
		t.Fatalf("overlay dials %v", v)
	}
	// The transfer went through the offloads: the sender's overlay stack
	// handed over large packets that its TUN cut (GSO), and the receiving
	// TUNs merged segments before their stacks (GRO; the echo goes back).
	if sa, sb := a.tun.Stats(), b.tun.Stats(); sa.Split == 0 || sa.Coalesced+sb.Coalesced == 0 {
		t.Fatalf("offloads unused: a %+v b %+v", sa, sb)
	}
	if v := gathered(t, a.reg, "tunmesh_wireguard_tun_offload_segments_total", "gso_split"); v == 0 || v > float64(a.tun.Stats().Split) {
		t.Fatalf("gso_split series %v, want the TUN's count %d", v, a.tun.Stats().Split)
	}

	// Garbage to b's port: dropped and counted.
	u, err := net.Dial("udp", net.JoinHostPort("127.0.0.2", itoa(portB)))
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range [][]byte{[]byte("GET / HTTP/1.1\r\n\r\n"), wgMessage(1, 148)} {
		if _, err := u.Write(g); err != nil {
			t.Fatal(err)
		}
	}
	u.Close()
	waitFor(t, 5*time.Second, "garbage counted", func() bool {
		return counter(b.metrics.dropped.WithLabelValues("malformed")) == 1 &&
			counter(b.metrics.dropped.WithLabelValues("invalid_handshake")) == 1
	})

	// Restart b: same key, a reconnects.
	keyB := b.PublicKey()
	ln.Close()
	b.stop()
	b = startTransport(t, client, "b", "127.0.0.2", dirB, portB)
	if b.PublicKey() != keyB {
		t.Fatal("restart changed the key")
	}
	ln, err = b.ListenOverlay()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	echo(t, ln, addrs)
	transfer(t, a, "127.0.0.1", "127.0.0.2", 64<<10)

	// Rotate b's key: delete it, restart; a follows the Node.
	ln.Close()
	b.stop()
	if err := os.Remove(filepath.Join(dirB, KeyFile)); err != nil {
		t.Fatal(err)
	}
	b = startTransport(t, client, "b", "127.0.0.2", dirB, portB)
	if b.PublicKey() == keyB {
		t.Fatal("key not rotated")
	}
	ln, err = b.ListenOverlay()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	echo(t, ln, addrs)
	waitFor(t, 5*time.Second, "a sees b's new key", func() bool {
		a.peers.mu.RLock()
		defer a.peers.mu.RUnlock()
		return a.peers.configured["b"].PublicKey == b.PublicKey()
	})
	transfer(t, a, "127.0.0.1", "127.0.0.2", 64<<10)
}

// TestUnderlayListenerRefusesWireGuardNodes: on the node address, tunnels
// from a node that publishes a key are refused (counted); from a node
// without one (rollout) and from this node, accepted.
func TestUnderlayListenerRefusesWireGuardNodes(t *testing.T) {
	p := NewPeers("a", false, &fakeDevice{}, nil, discard())
	p.Update(testNode("a", "127.0.0.1", nil, nil))
	p.Update(testNode("b", "127.0.0.2", nil, testPublished(t, "127.0.0.2").Annotations()))
	p.Update(testNode("c", "127.0.0.3", nil, nil))
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var refused atomic.Int32 // counted on the accept goroutine
	ln := &underlayListener{Listener: inner, route: p.Route, refused: func() { refused.Add(1) }}
	defer ln.Close()
	accepted := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	for _, from := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.1"} {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		c, err := d.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		// A refused connection is closed without a byte.
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Read(make([]byte, 1))
		c.Close()
	}
	got := []string{<-accepted, <-accepted}
	if !bytes.Equal([]byte(got[0]+got[1]), []byte("127.0.0.3127.0.0.1")) || refused.Load() != 1 {
		t.Fatalf("accepted %v refused %d, want 127.0.0.3 and 127.0.0.1 accepted, 127.0.0.2 refused", got, refused.Load())
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func counter(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// TestDialRoutes: the rollout rule at the dialling side. A node without a
// key is dialled on its node address (as with transport tcp); a node whose
// annotations are unusable is not dialled at all (never in clear); both
// counted.
func TestDialRoutes(t *testing.T) {
	client := fake.NewClientset()
	tr, err := New(Config{NodeName: "a", NodeIP: netip.MustParseAddr("127.0.0.1"), Port: freeUDPPort(t), StateDir: t.TempDir(), MeshPort: testMeshPort}, client, prometheus.NewRegistry(), discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.dev.Close)
	ln, err := net.Listen("tcp", "127.0.0.3:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	tr.peers.Update(testNode("c", "127.0.0.3", nil, nil))
	bad := testPublished(t, "127.0.0.4").Annotations()
	bad[AnnotationOverlay] = "fd74:6d77:67::1"
	tr.peers.Update(testNode("d", "127.0.0.4", nil, bad))

	ctx := context.Background()
	c, err := tr.DialTCP(netip.MustParseAddr("127.0.0.1"))(ctx, netip.MustParseAddr("127.0.0.3"), port)
	if err != nil {
		t.Fatalf("keyless node: %v", err)
	}
	if got := c.LocalAddr().(*net.TCPAddr).IP.String(); got != "127.0.0.1" {
		t.Errorf("underlay dial from %s, want the node address", got)
	}
	c.Close()
	if _, err := tr.DialTCP(netip.Addr{})(ctx, netip.MustParseAddr("127.0.0.4"), port); !errors.Is(err, ErrRefusedPeer) {
		t.Fatalf("refused node: err %v, want ErrRefusedPeer", err)
	}
	if u, r := counter(tr.metrics.dials.WithLabelValues("underlay")), counter(tr.metrics.refused.WithLabelValues("refused_peer")); u != 1 || r != 1 {
		t.Fatalf("underlay dials %v, refused %v", u, r)
	}
}

// TestSyncedMeansPeersKnown: when Synced turns true the peer table holds
// every node of the initial list (the handler registration's HasSynced:
// the informer's own turns true before its handlers have run).
func TestSyncedMeansPeersKnown(t *testing.T) {
	requireRoot(t)
	const n = 400
	var objs []runtime.Object
	objs = append(objs, testNode("a", "127.0.0.1", []string{"10.244.0.0/24"}, nil))
	for i := 1; i <= n; i++ {
		ip := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}).String()
		objs = append(objs, testNode("n"+itoa(i), ip, []string{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + i>>8), byte(i), 0}), 24).String()}, testPublished(t, ip).Annotations()))
	}
	client := fake.NewClientset(objs...)
	tr, err := New(Config{NodeName: "a", NodeIP: netip.MustParseAddr("127.0.0.1"), Port: freeUDPPort(t), StateDir: t.TempDir(), MeshPort: testMeshPort},
		client, prometheus.NewRegistry(), discard())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tr.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitForTight(t, 20*time.Second, "synced", tr.Synced)
	if c, r, u := tr.peers.Counts(); c != n {
		t.Fatalf("synced with %d of %d peers configured (refused %d, underlay %d)", c, n, r, u)
	}
}

// waitForTight polls without sleeping (to catch the first moment try holds).
func waitForTight(t testing.TB, max time.Duration, what string, try func() bool) {
	t.Helper()
	deadline := time.Now().Add(max)
	for !try() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		goruntime.Gosched()
	}
}

// TestReadyNeedsLocalPodCIDR: with encrypt-all the transport is not
// ready while its own Node has no IPv4 pod CIDR.
func TestReadyNeedsLocalPodCIDR(t *testing.T) {
	requireRoot(t)
	client := fake.NewClientset(testNode("a", "127.0.0.1", []string{"fd00:1::/64"}, nil))
	tr, err := New(Config{NodeName: "a", NodeIP: netip.MustParseAddr("127.0.0.1"), Port: freeUDPPort(t), StateDir: t.TempDir(), MeshPort: testMeshPort, EncryptAll: true},
		client, prometheus.NewRegistry(), discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.dev.Close)
	tr.published.Store(true)
	tr.synced.Store(true)
	tr.peers.Update(testNode("a", "127.0.0.1", []string{"fd00:1::/64"}, nil))
	if err := tr.Ready(); err == nil || !strings.Contains(err.Error(), "IPv4 pod CIDR") {
		t.Fatalf("no IPv4 pod CIDR: Ready %v", err)
	}
	tr.peers.Update(testNode("a", "127.0.0.1", []string{"10.244.0.0/24"}, nil))
	if err := tr.Ready(); err != nil {
		t.Fatalf("with a pod CIDR: %v", err)
	}
}

// gathered is the value of the series name{<its one label>=label} in reg.
func gathered(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == label {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no series %s{%s}", name, label)
	return 0
}
