package mesh

import (
	"context"
	"io"
	"net"
	"sort"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// BenchmarkMeshVsPlain compares, in one run on one cluster, pod-to-pod TCP
// across nodes through the mesh with the same between pods opted out of
// the mesh (the kernel path: veth, bridge, host-gw route): bulk throughput
// (32 MiB one way per op), round-trip latency of 1-byte ping-pongs on an
// open connection, and connection set-up (connect + first round trip).
// Ratios are mesh/plain; medians, since the machine is shared.
func BenchmarkMeshVsPlain(b *testing.B) {
	c := e2eenv.Need(b)
	ns := c.Namespace(b, "mesh-bench-"+e2eenv.RandomSuffix())
	off := map[string]string{"tunmesh.io/inject": "disabled"}
	pods := c.StartPods(b, ns,
		e2eenv.PodSpec{Name: "m-client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "m-server", SA: "server", Node: "node-2"},
		e2eenv.PodSpec{Name: "p-client", SA: "client", Node: "node-1", Annotations: off},
		e2eenv.PodSpec{Name: "p-server", SA: "server", Node: "node-2", Annotations: off},
	)
	for _, s := range []string{"m-server", "p-server"} {
		sink(b, c, pods[s], 9700)
		echoServer(b, c, pods[s], 9701)
	}
	const size = 32 << 20
	type result struct{ bulk, rtt, setup []time.Duration }
	run := func(from, to *corev1.Pod) result {
		var r result
		dst := to.Status.PodIP
		start := time.Now()
		send(b, c, from, net.JoinHostPort(dst, "9700"), size)
		r.bulk = append(r.bulk, time.Since(start))
		conn := dial(b, c, from, net.JoinHostPort(dst, "9701"))
		buf := []byte{1}
		for i := 0; i < 50; i++ {
			t0 := time.Now()
			if _, err := conn.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(conn, buf); err != nil {
				b.Fatal(err)
			}
			r.rtt = append(r.rtt, time.Since(t0))
		}
		conn.Close()
		for i := 0; i < 5; i++ {
			t0 := time.Now()
			conn := dial(b, c, from, net.JoinHostPort(dst, "9701"))
			if _, err := conn.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(conn, buf); err != nil {
				b.Fatal(err)
			}
			r.setup = append(r.setup, time.Since(t0))
			conn.Close()
		}
		return r
	}
	var mesh, plain result
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m := run(pods["m-client"], pods["m-server"])
		p := run(pods["p-client"], pods["p-server"])
		mesh.bulk, mesh.rtt, mesh.setup = append(mesh.bulk, m.bulk...), append(mesh.rtt, m.rtt...), append(mesh.setup, m.setup...)
		plain.bulk, plain.rtt, plain.setup = append(plain.bulk, p.bulk...), append(plain.rtt, p.rtt...), append(plain.setup, p.setup...)
	}
	b.StopTimer()
	mbps := func(d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }
	mb, pb := mbps(median(mesh.bulk)), mbps(median(plain.bulk))
	b.ReportMetric(mb, "mesh-MB/s")
	b.ReportMetric(pb, "plain-MB/s")
	b.ReportMetric(mb/pb, "throughput-ratio")
	b.ReportMetric(float64(median(mesh.rtt).Microseconds()), "mesh-rtt-µs")
	b.ReportMetric(float64(median(plain.rtt).Microseconds()), "plain-rtt-µs")
	b.ReportMetric(float64(median(mesh.setup).Microseconds()), "mesh-setup-µs")
	b.ReportMetric(float64(median(plain.setup).Microseconds()), "plain-setup-µs")
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func dial(b testing.TB, c *e2eenv.Cluster, from *corev1.Pod, dst string) net.Conn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.PodNetns(from), "tcp", dst)
	if err != nil {
		b.Fatalf("dial %s: %v", dst, err)
	}
	return conn
}

// send streams n zero bytes to a sink and waits for its one-byte ack.
func send(b testing.TB, c *e2eenv.Cluster, from *corev1.Pod, dst string, n int) {
	b.Helper()
	conn := dial(b, c, from, dst)
	defer conn.Close()
	buf := make([]byte, 256<<10)
	for left := n; left > 0; left -= len(buf) {
		if _, err := conn.Write(buf[:min(left, len(buf))]); err != nil {
			b.Fatal(err)
		}
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	if _, err := io.ReadFull(conn, buf[:1]); err != nil {
		b.Fatalf("sink ack: %v", err)
	}
}

func sink(b testing.TB, c *e2eenv.Cluster, pod *corev1.Pod, port int) {
	listen(b, c, pod, port, func(conn net.Conn) {
		_, _ = io.Copy(io.Discard, conn)
		_, _ = conn.Write([]byte{1})
	})
}

func echoServer(b testing.TB, c *e2eenv.Cluster, pod *corev1.Pod, port int) {
	listen(b, c, pod, port, func(conn net.Conn) { _, _ = io.Copy(conn, conn) })
}

func listen(b testing.TB, c *e2eenv.Cluster, pod *corev1.Pod, port int, handle func(net.Conn)) {
	b.Helper()
	ln, err := namedns.Listen(c.PodNetns(pod), "tcp", ":"+strconv.Itoa(port))
	if err != nil {
		b.Fatal(err)
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); handle(conn) }()
		}
	}()
	b.Cleanup(func() { ln.Close() })
}
