package wireguard

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"k8s.io/client-go/kubernetes/fake"
)

// benchBytes is what one iteration moves through the tunnel.
const benchBytes = 64 << 20

// BenchmarkOverlayThroughput: one TCP stream through two WireGuard devices
// on loopback, one way, as the mesh tunnels use them: this package's TUN
// (batched, gVisor overlay stack) against wireguard-go's stock
// tun/netstack (one packet per read) in the same set-up.
//
//	go test -run '^$' -bench OverlayThroughput -benchtime 5x ./node/wireguard/
func BenchmarkOverlayThroughput(b *testing.B) {
	if testing.Short() {
		b.Skip("short")
	}
	for _, mtu := range []int{DefaultMTU, 8920, 65000} {
		b.Run(fmt.Sprintf("tunmesh-mtu%d", mtu), func(b *testing.B) { benchTunmesh(b, mtu) })
	}
	b.Run("wireguard-go-netstack", func(b *testing.B) {
		requireRoot(b)
		ka, kb := mustKey(b), mustKey(b)
		oa, ob := netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
		pa, pb := freeUDPPort(b), freeUDPPort(b)
		tunA, netA, err := netstack.CreateNetTUN([]netip.Addr{oa}, nil, DefaultMTU)
		if err != nil {
			b.Fatal(err)
		}
		tunB, netB, err := netstack.CreateNetTUN([]netip.Addr{ob}, nil, DefaultMTU)
		if err != nil {
			b.Fatal(err)
		}
		quiet := device.NewLogger(device.LogLevelSilent, "")
		devA := device.NewDevice(tunA, conn.NewStdNetBind(), quiet)
		devB := device.NewDevice(tunB, conn.NewStdNetBind(), quiet)
		defer devA.Close()
		defer devB.Close()
		for _, c := range []struct {
			dev       *device.Device
			priv, pub Key
			port      int
			peerPort  int
			peerAddr  netip.Addr
		}{{devA, ka, kb.PublicKey(), pa, pb, ob}, {devB, kb, ka.PublicKey(), pb, pa, oa}} {
			if err := c.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\npublic_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/128\n",
				c.priv.Hex(), c.port, c.pub.Hex(), c.peerPort, c.peerAddr)); err != nil {
				b.Fatal(err)
			}
			if err := c.dev.Up(); err != nil {
				b.Fatal(err)
			}
		}
		ln, err := netB.ListenTCPAddrPort(netip.AddrPortFrom(ob, testMeshPort))
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		runThroughput(b, ln, func(ctx context.Context) (net.Conn, error) {
			return netA.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(ob, testMeshPort))
		})
	})
}

// benchTunmesh runs the tunmesh transport pair with the given inner MTU.
func benchTunmesh(b *testing.B, mtu int) {
	requireRoot(b)
	client := fake.NewClientset(testNode("a", "127.0.0.1", nil, nil), testNode("b", "127.0.0.2", nil, nil))
	a := startTransport(b, client, "a", "127.0.0.1", b.TempDir(), freeUDPPort(b), mtu)
	bb := startTransport(b, client, "b", "127.0.0.2", b.TempDir(), freeUDPPort(b), mtu)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if r, _ := a.peers.Route(netip.MustParseAddr("127.0.0.2")); r == RouteOverlay {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("peers not configured")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ln, err := bb.ListenOverlay()
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	runThroughput(b, ln, func(ctx context.Context) (net.Conn, error) {
		return a.DialTCP(netip.Addr{})(ctx, netip.MustParseAddr("127.0.0.2"), testMeshPort)
	})
	// How much the offloads did: segments cut from the sender's large
	// packets (GSO) and merged at the receiver (GRO), per iteration.
	b.ReportMetric(float64(a.tun.Stats().Split)/float64(b.N), "gso-split/op")
	b.ReportMetric(float64(bb.tun.Stats().Coalesced)/float64(b.N), "gro-merged/op")
}

// runThroughput sends benchBytes per iteration from a dialled connection
// to the listener's side, which discards them.
func runThroughput(b *testing.B, ln net.Listener, dial func(context.Context) (net.Conn, error)) {
	done := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		done <- n
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	b.SetBytes(benchBytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for sent := 0; sent < benchBytes; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
	}
	c.Close()
	if n := <-done; n != int64(b.N)*benchBytes {
		b.Fatalf("received %d bytes, want %d", n, int64(b.N)*benchBytes)
	}
	b.StopTimer()
}
