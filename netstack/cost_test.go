package netstack

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// usage is what the process holds at one moment.
type usage struct {
	heap       uint64 // bytes of live heap after a GC
	goroutines int
	threads    int
	rss        uint64 // bytes
}

func measure(t testing.TB) usage {
	t.Helper()
	// Two GCs: sync.Pool contents survive one.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	u := usage{heap: ms.HeapAlloc, goroutines: runtime.NumGoroutine()}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(status, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseUint(string(f[1]), 10, 64)
		switch string(f[0]) {
		case "Threads:":
			u.threads = int(v)
		case "VmRSS:":
			u.rss = v << 10
		}
	}
	return u
}

// attachPods attaches pods [first, first+n) to s.
func attachPods(t testing.TB, s *Stack, first, n int) []pod {
	t.Helper()
	var pods []pod
	for i := range n {
		pods = append(pods, newPod(t, s, first+i, 65520))
	}
	return pods
}

// openIdle opens conns terminated connections from each pod that then sit
// idle (the handler holds them until the stack closes), and returns once
// every one is served.
func openIdle(t testing.TB, pods []pod, held chan net.Conn, conns int) {
	t.Helper()
	for _, p := range pods {
		for c := range conns {
			conn := p.dial(t, "tcp", netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr("10.201.0.5"), uint16(9000+c)))
			if _, err := conn.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range len(pods) * conns {
		select {
		case <-held:
		case <-time.After(10 * time.Second):
			t.Fatal("connection not served")
		}
	}
}

// idleHandler terminates every flow and keeps the connection open, idle,
// until the stack closes.
func idleHandler(held chan net.Conn) *testHandler {
	return &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(ctx context.Context, conn net.Conn, _ Flow) {
			buf := make([]byte, 1)
			if _, err := conn.Read(buf); err != nil {
				return
			}
			held <- conn
			<-ctx.Done()
		},
	}
}

// TestIdleNICsHoldNoThreads: an attached pod costs a parked goroutine, not
// an OS thread blocked in read (the TUN is read through the netpoller).
func TestIdleNICsHoldNoThreads(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	held := make(chan net.Conn, 64)
	s := newStack(t, Options{Handler: idleHandler(held), Passthrough: &recorder{}})
	openIdle(t, attachPods(t, s, 30, 1), held, 1) // warm up: gVisor's own goroutines
	before := measure(t)
	const n = 24
	attachPods(t, s, 31, n)
	time.Sleep(100 * time.Millisecond) // let readers park
	after := measure(t)
	if d := after.threads - before.threads; d > n/4 {
		t.Errorf("%d NICs added %d OS threads; want readers parked in the netpoller", n, d)
	}
	if d := after.goroutines - before.goroutines; d > 2*n {
		t.Errorf("%d NICs added %d goroutines, want at most 2 each", n, d)
	}
	t.Logf("per NIC: %d B heap, %.1f goroutines, %.2f threads",
		int64(after.heap-before.heap)/n, float64(after.goroutines-before.goroutines)/n, float64(after.threads-before.threads)/n)
}

// BenchmarkIdleCost states the netstack's cost of attached pods and idle
// terminated connections: heap, goroutines and OS threads per NIC, heap per
// connection, and the process RSS at the end (an upper bound for the
// netstack's share of the agent's). Each op is one setup, so run it once:
//
//	go test -run '^$' -bench IdleCost -benchtime 1x ./netstack/
func BenchmarkIdleCost(b *testing.B) {
	nstest.SkipUnlessRoot(b)
	const npods, connsPerPod = 100, 10
	for range b.N {
		func() {
			held := make(chan net.Conn, npods*connsPerPod)
			s, err := New(Options{Handler: idleHandler(held), Passthrough: &recorder{}}, testLogger(b))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			base := measure(b)
			pods := attachPods(b, s, 1, npods)
			time.Sleep(100 * time.Millisecond)
			nics := measure(b)
			openIdle(b, pods, held, connsPerPod)
			time.Sleep(100 * time.Millisecond)
			conns := measure(b)
			b.StopTimer()
			nconns := npods * connsPerPod
			b.ReportMetric(float64(nics.heap-base.heap)/npods, "heap-B/nic")
			b.ReportMetric(float64(nics.goroutines-base.goroutines)/npods, "goroutines/nic")
			b.ReportMetric(float64(nics.threads-base.threads)/npods, "threads/nic")
			b.ReportMetric(float64(conns.heap-nics.heap)/float64(nconns), "heap-B/conn")
			b.ReportMetric(float64(conns.goroutines-nics.goroutines)/float64(nconns), "goroutines/conn")
			b.ReportMetric(float64(conns.rss)/(1<<20), "rss-MiB")
			fmt.Fprintf(os.Stderr, "idle cost: %d NICs: heap +%d KiB, goroutines +%d, threads +%d; %d idle conns: heap +%d KiB, goroutines +%d; process rss %d MiB (before the NICs %d MiB)\n",
				npods, (nics.heap-base.heap)>>10, nics.goroutines-base.goroutines, nics.threads-base.threads,
				nconns, (conns.heap-nics.heap)>>10, conns.goroutines-nics.goroutines, conns.rss>>20, base.rss>>20)
		}()
	}
}
