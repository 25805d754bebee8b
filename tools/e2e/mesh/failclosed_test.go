package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// killAgent SIGKILLs the agent of node and waits until its successor is
// ready.
func killAgent(t *testing.T, c *e2eenv.Cluster, node string) {
	t.Helper()
	old := c.AgentPID(node)
	if old == 0 {
		t.Fatalf("agent of %s not found", node)
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 60*time.Second, "agent of "+node+" restarted and ready", func() error {
		if pid := c.AgentPID(node); pid == 0 || pid == old {
			return errors.New("no new agent yet")
		}
		return c.AgentReady(node)
	})
}

// noMarkerInClear fails t if the capture holds the marker in clear.
func noMarkerInClear(t *testing.T, pcap string) {
	t.Helper()
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), marker) {
		t.Fatal("meshed bytes crossed the underlay in clear")
	}
}

// TestNoPlaintextThroughAgentRestart (items 1 and 3): a meshed connection
// keeps sending while its node's agent is killed and restarted. The pod's
// kernel retransmits the unacknowledged segments into tm0, where the new
// agent neither owns nor remembers the flow; they must not be passed to the
// node in clear (before the fix they were), and connections opened while
// the new agent syncs are held, then meshed. tshark on the underlay sees
// only TLS.
func TestNoPlaintextThroughAgentRestart(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-fc-restart")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
	)
	serve(t, c, pods["server"], 9960)
	dst := net.JoinHostPort(pods["server"].Status.PodIP, "9960")
	payload := []byte(strings.Repeat(marker, 16))
	pcap := e2eenv.CaptureUnderlay(t, c, "tcp.dstport == 4143 && tls.app_data", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := namedns.DialContext(ctx, c.PodNetns(pods["client"]), "tcp", dst)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		go func() { _, _ = io.Copy(io.Discard, conn) }()
		stop := make(chan struct{})
		writerDone := make(chan struct{})
		go func() { // keeps unacknowledged meshed bytes in the pod's kernel across the restart
			defer close(writerDone)
			for {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				_ = conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				_, _ = conn.Write(payload)
			}
		}()
		time.Sleep(300 * time.Millisecond)
		killAgent(t, c, "node-1")
		// New connections right after the restart are meshed.
		e2eenv.WaitFor(t, 10*time.Second, "meshed connection after the restart", func() error {
			return tryTransfer(c, pods["client"], dst)
		})
		transfer(t, c, pods["client"], dst, 0, payload)
		time.Sleep(3 * time.Second) // the old connection's retransmissions
		close(stop)
		<-writerDone
	})
	noMarkerInClear(t, pcap)
	if n := agentMetric(t, c, "node-1", "tunmesh_node_fail_closed_total", ""); n == 0 {
		t.Error("no fail-closed drop counted for the old connection's segments")
	}
}

// TestClusterIPMixedBackends (item 2): a Service with a meshed and an
// opted-out backend, reached from a meshed pod, always reaches the meshed
// one through the mesh: the agent's choice is final (before the fix, a
// flow resolved to the opted-out backend was passed to the kernel as a
// ClusterIP flow, which kube-proxy balances over both, meshed included, in
// clear; this cluster has no kube-proxy, so those connections failed).
func TestClusterIPMixedBackends(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-fc-mixed")
	labels := map[string]string{"app": "mixed"}
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "meshed", SA: "backend", Node: "node-2", Labels: labels, ReadyPort: 9970},
		e2eenv.PodSpec{Name: "plain", SA: "backend", Node: "node-2", Labels: labels, ReadyPort: 9970, Annotations: map[string]string{"tunmesh.io/inject": "disabled"}},
	)
	meshedSrv := serve(t, c, pods["meshed"], 9970)
	plainSrv := serve(t, c, pods["plain"], 9970)
	svc, err := c.Client.CoreV1().Services(ns).Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "mixed"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(9970)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitReadyFor(t, c, ns, "mixed", 2)
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	payload := []byte(strings.Repeat(marker, 8))
	const n = 20
	pcap := e2eenv.CaptureUnderlay(t, c, "tcp.dstport == 4143 && tls.app_data", func() {
		for range n {
			transfer(t, c, pods["client"], vip, 0, payload)
		}
	})
	noMarkerInClear(t, pcap)
	client := pods["client"].Status.PodIP
	count := func(s *server) int {
		r, _ := s.seen()
		var k int
		for _, a := range r {
			if a.String() == client {
				k++
			}
		}
		return k
	}
	e2eenv.WaitFor(t, 5*time.Second, "the meshed backend recorded every connection", func() error {
		if m, p := count(meshedSrv), count(plainSrv); m != n || p != 0 {
			return fmt.Errorf("meshed backend %d, opted-out backend %d, want %d and 0", m, p, n)
		}
		return nil
	})
}

// TestMidStreamAgentKillIsReset (item 7): the server side's agent dies in
// the middle of a response. The client pod's read must fail with a reset,
// never end as if the response were complete (before the fix the client
// agent took the dead peer's FIN as a clean end and passed a FIN on). No
// byte of the stream crosses the underlay in clear meanwhile.
func TestMidStreamAgentKillIsReset(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-fc-cut")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "server", SA: "server", Node: "node-2"},
	)
	ln, err := namedns.Listen(c.PodNetns(pods["server"]), "tcp", ":9980")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() { // an endless response
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				chunk := []byte(strings.Repeat(marker, 32))
				for {
					if _, err := conn.Write(chunk); err != nil {
						return
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
		}
	}()
	var readErr error
	var got int64
	pcap := e2eenv.CaptureUnderlay(t, c, "tcp.srcport == 4143 && tls.app_data", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := namedns.DialContext(ctx, c.PodNetns(pods["client"]), "tcp", net.JoinHostPort(pods["server"].Status.PodIP, "9980"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			got, readErr = io.Copy(io.Discard, conn)
		}()
		time.Sleep(500 * time.Millisecond)
		killAgent(t, c, "node-2")
		<-done
	})
	noMarkerInClear(t, pcap)
	if got == 0 {
		t.Fatal("no bytes of the response arrived before the kill")
	}
	if !errors.Is(readErr, syscall.ECONNRESET) {
		t.Fatalf("client read %d bytes and ended with %v, want ECONNRESET (a cut stream must not look complete)", got, readErr)
	}
}

// waitReadyFor waits until Service svc has n ready endpoints.
func waitReadyFor(t *testing.T, c *e2eenv.Cluster, ns, svc string, n int) {
	t.Helper()
	e2eenv.WaitFor(t, 60*time.Second, fmt.Sprintf("%d ready endpoints of %s", n, svc), func() error {
		list, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=" + svc})
		if err != nil {
			return err
		}
		var ready int
		for _, s := range list.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready {
					ready += len(e.Addresses)
				}
			}
		}
		if ready != n {
			return fmt.Errorf("%d ready", ready)
		}
		return nil
	})
}
