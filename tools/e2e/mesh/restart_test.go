package mesh

import (
	"context"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// TestAgentRestartKeepsPods: SIGKILL the agent of a node; it is restarted
// (as a DaemonSet pod would be), re-attaches the running pods from its
// state, and new meshed connections from and to those pods succeed within
// 2 s of it being ready; no pod is restarted.
func TestAgentRestartKeepsPods(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-restart")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
		e2eenv.PodSpec{Name: "local", SA: "server", Node: "node-1"},
	)
	serve(t, c, pods["server"], 9950)
	serve(t, c, pods["local"], 9951)
	transfer(t, c, pods["client"], net.JoinHostPort(pods["server"].Status.PodIP, "9950"), 1<<10, nil)

	old := c.AgentPID("node-1")
	if old == 0 {
		t.Fatal("agent of node-1 not found")
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ready time.Time
	e2eenv.WaitFor(t, 60*time.Second, "agent of node-1 restarted and ready", func() error {
		pid := c.AgentPID("node-1")
		if pid == 0 || pid == old {
			return fmt.Errorf("no new agent yet")
		}
		if err := c.AgentReady("node-1"); err != nil {
			return err
		}
		ready = time.Now()
		return nil
	})
	for _, dst := range []string{
		net.JoinHostPort(pods["server"].Status.PodIP, "9950"), // from the restarted node
		net.JoinHostPort(pods["local"].Status.PodIP, "9951"),  // to a pod of the restarted node
	} {
		e2eenv.WaitFor(t, 2*time.Second, "meshed connection to "+dst+" after the restart", func() error {
			return tryTransfer(c, pods["client"], dst)
		})
	}
	t.Logf("meshed connections work %s after the restarted agent was ready", time.Since(ready).Round(time.Millisecond))
	if n := agentMetric(t, c, "node-1", "tunmesh_node_meshed_pods", ""); n < 2 {
		t.Fatalf("restarted agent holds %v meshed pods, want the 2 running ones", n)
	}
	for name, p := range pods {
		now := c.Pod(t, ns, name)
		if now.UID != p.UID || now.Status.ContainerStatuses[0].RestartCount != 0 {
			t.Fatalf("pod %s was restarted or replaced", name)
		}
	}
}

// tryTransfer echoes a short message through dst without failing the test.
func tryTransfer(c *e2eenv.Cluster, from *corev1.Pod, dst string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.PodNetns(from), "tcp", dst)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("after restart")); err != nil {
		return err
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(conn)
	if err != nil {
		return err
	}
	if string(b) != "after restart" {
		return fmt.Errorf("echo %q", b)
	}
	return nil
}
