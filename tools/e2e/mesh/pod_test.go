package mesh

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// TestSpoofedSourceDropped: a pod that sends with a source address other
// than its own (here: a second address it adds to eth0) gets nothing
// through tm0; the packets are dropped and counted.
func TestSpoofedSourceDropped(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-spoof")
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "spoofer", SA: "spoofer", Node: "node-1"},
		e2eenv.PodSpec{Name: "target", SA: "target", Node: "node-2"},
	)
	serve(t, c, pods["target"], 9800)
	netns := c.PodNetns(pods["spoofer"])
	const fake = "10.244.1.250"
	if out, err := inNetns(netns, "ip", "addr", "add", fake+"/32", "dev", "eth0"); err != nil {
		t.Fatalf("add spoofed address: %v\n%s", err, out)
	}
	pod := ns + "/spoofer"
	before := agentMetric(t, c, "node-1", "tunmesh_node_spoofed_packets_total", `pod="`+pod+`"`)
	err := namedns.Do(netns, func() error {
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(fake)}}
		conn, err := d.Dial("tcp", net.JoinHostPort(pods["target"].Status.PodIP, "9800"))
		if err == nil {
			conn.Close()
		}
		return err
	})
	if err == nil {
		t.Fatal("a connection from a spoofed source address got through")
	}
	if after := agentMetric(t, c, "node-1", "tunmesh_node_spoofed_packets_total", `pod="`+pod+`"`); after <= before {
		t.Fatalf("spoofed packets not counted: %v -> %v", before, after)
	}
	// The pod's own address still works.
	transfer(t, c, pods["spoofer"], net.JoinHostPort(pods["target"].Status.PodIP, "9800"), 1<<10, nil)
}

// TestNodeReachesMeshedPod: a kubelet-like connection from the node (the
// bridge side) to a meshed pod works in plaintext; its replies leave
// through tm0 and are passed through.
func TestNodeReachesMeshedPod(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-probe")
	pods := c.StartPods(t, ns, e2eenv.PodSpec{Name: "web", SA: "web", Node: "node-2", ReadyPort: 9900})
	serve(t, c, pods["web"], 9900)
	e2eenv.WaitFor(t, 30*time.Second, "probed pod ready", func() error {
		if !e2eenv.PodReady(c.Pod(t, ns, "web")) {
			return fmt.Errorf("not ready")
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.State.Nodes[1].Netns, "tcp", net.JoinHostPort(pods["web"].Status.PodIP, "9900"))
	if err != nil {
		t.Fatalf("node-2 to its meshed pod: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("probe\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := conn.Read(buf); err != nil || string(buf) != "probe\n" {
		t.Fatalf("echo from the pod: %q %v", buf, err)
	}
}

// TestBadAnnotationWarns: a bad skip list yields a Warning event on the
// pod, and the rest of its policy applies (it is meshed).
func TestBadAnnotationWarns(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-annot")
	c.StartPods(t, ns, e2eenv.PodSpec{Name: "odd", SA: "odd", Node: "node-1", Annotations: map[string]string{"config.tunmesh.io/skip-inbound-ports": "80,http"}})
	e2eenv.WaitFor(t, 30*time.Second, "InvalidMeshAnnotation event", func() error {
		evs, err := c.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
			FieldSelector: fields.Set{"involvedObject.name": "odd", "reason": "InvalidMeshAnnotation"}.String(),
		})
		if err != nil {
			return err
		}
		if len(evs.Items) == 0 || evs.Items[0].Type != "Warning" || !strings.Contains(evs.Items[0].Message, "skip-inbound-ports") {
			return fmt.Errorf("events: %+v", evs.Items)
		}
		return nil
	})
	out, err := inNetns(c.PodNetns(c.Pod(t, ns, "odd")), "ip", "link", "show", "tm0")
	if err != nil {
		t.Fatalf("pod with a bad annotation is not meshed (no tm0): %v\n%s", err, out)
	}
}
