package mesh

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// agentRSS is the resident memory of node's agent in bytes.
func agentRSS(t *testing.T, c *e2eenv.Cluster, node string) int64 {
	t.Helper()
	pid := c.AgentPID(node)
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("agent of %s: %v", node, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS for the agent of %s", node)
	return 0
}

// TestFloodFromOnePod (item 8): one pod floods its node's agent with SYNs
// to addresses nobody answers (passthrough flow and SYN-copy tables), with
// meshed connections it holds open, and with garbage to the node's mesh
// port; meanwhile another pod of the same node keeps its meshed
// connections working, and the agent's memory stays under 256 MiB.
func TestFloodFromOnePod(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-flood")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "flooder", SA: "flooder", Node: "node-1"},
		e2eenv.PodSpec{Name: "victim", SA: "victim", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
	)
	serve(t, c, pods["server"], 9700)
	var node1IP string
	for _, n := range c.State.Nodes {
		if n.Name == "node-1" {
			node1IP = n.IP
		}
	}
	before := agentRSS(t, c, "node-1")
	flooder := c.PodNetns(pods["flooder"])
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var held sync.Map
	flood := func(workers int, fn func(i int)) {
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; ctx.Err() == nil; i += workers {
					fn(i)
				}
			}()
		}
	}
	// SYNs to pod addresses nobody holds: passthrough, never answered.
	flood(64, func(i int) {
		dst := fmt.Sprintf("10.244.%d.%d:%d", 200+i%50, 1+i%250, 1000+i%5000)
		dctx, dcancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer dcancel()
		if conn, err := namedns.DialContext(dctx, flooder, "tcp", dst); err == nil {
			conn.Close()
		}
	})
	// Garbage to the node's mesh port.
	flood(32, func(int) {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		defer dcancel()
		conn, err := namedns.DialContext(dctx, flooder, "tcp", net.JoinHostPort(node1IP, "4143"))
		if err != nil {
			return
		}
		_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = conn.Read(make([]byte, 1))
		conn.Close()
	})
	// Meshed connections held open (up to 500).
	flood(8, func(i int) {
		if i >= 500 {
			time.Sleep(100 * time.Millisecond)
			return
		}
		dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
		defer dcancel()
		if conn, err := namedns.DialContext(dctx, flooder, "tcp", net.JoinHostPort(pods["server"].Status.PodIP, "9700")); err == nil {
			held.Store(i, conn)
		}
	})
	time.Sleep(2 * time.Second) // the flood is on
	dst := net.JoinHostPort(pods["server"].Status.PodIP, "9700")
	for i := 0; i < 30; i++ {
		if err := tryTransferTimeout(c, pods["victim"], dst, 3*time.Second); err != nil {
			t.Errorf("victim's meshed connection %d during the flood: %v", i, err)
		}
	}
	peak := agentRSS(t, c, "node-1")
	cancel()
	wg.Wait()
	held.Range(func(_, v any) bool { v.(net.Conn).Close(); return true })
	t.Logf("agent RSS %d MiB before, %d MiB during the flood", before>>20, peak>>20)
	if peak > 256<<20 {
		t.Errorf("agent RSS %d MiB during the flood, want < 256 MiB", peak>>20)
	}
}

// tryTransferTimeout echoes a short message through dst within timeout.
func tryTransferTimeout(c *e2eenv.Cluster, from *corev1.Pod, dst string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.PodNetns(from), "tcp", dst)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte("during flood")); err != nil {
		return err
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	b := make([]byte, 64)
	n, _ := conn.Read(b)
	if string(b[:n]) != "during flood" {
		return fmt.Errorf("echo %q", b[:n])
	}
	return nil
}
