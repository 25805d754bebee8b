package mesh

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// TestClusterIPSpread: connections to a ClusterIP are resolved by the
// agent to ready endpoints and spread over all three; an endpoint that
// turns not-ready gets no new connections.
func TestClusterIPSpread(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-svc")
	labels := map[string]string{"app": "spread"}
	pods := c.StartPods(t, ns,
		e2eenv.PodSpec{Name: "client", SA: "client", Node: "node-1"},
		e2eenv.PodSpec{Name: "backend-a", SA: "backend", Node: "node-1", Labels: labels, ReadyPort: 9500},
		e2eenv.PodSpec{Name: "backend-b", SA: "backend", Node: "node-2", Labels: labels, ReadyPort: 9500},
		e2eenv.PodSpec{Name: "backend-c", SA: "backend", Node: "node-2", Labels: labels, ReadyPort: 9500},
	)
	servers := map[string]*server{}
	for _, b := range []string{"backend-a", "backend-b", "backend-c"} {
		servers[b] = serve(t, c, pods[b], 9500)
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "spread"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(9500)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, c, ns, 3)
	vip := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	// Connections from the client pod only: kubelet probes reach the
	// backends too (from the node's gateway address).
	client := pods["client"].Status.PodIP
	counts := func() map[string]int {
		m := map[string]int{}
		for name, s := range servers {
			r, _ := s.seen()
			for _, a := range r {
				if a.String() == client {
					m[name]++
				}
			}
		}
		return m
	}
	for i := 0; i < 30; i++ {
		transfer(t, c, pods["client"], vip, 0, []byte(fmt.Sprintf("request %d\n", i)))
	}
	var got map[string]int
	e2eenv.WaitFor(t, 5*time.Second, "servers recorded the connections", func() error {
		if got = counts(); got["backend-a"]+got["backend-b"]+got["backend-c"] < 30 {
			return fmt.Errorf("%v", got)
		}
		return nil
	})
	for name, n := range got {
		if n == 0 {
			t.Fatalf("backend %s got no connection out of 30: %v", name, got)
		}
	}
	t.Logf("30 connections spread as %v", got)

	// backend-c stops listening: its tcpSocket probe fails, the endpoint
	// turns not-ready, and new connections avoid it.
	servers["backend-c"].ln.Close()
	waitReady(t, c, ns, 2)
	before := counts()
	for i := 0; i < 20; i++ {
		transfer(t, c, pods["client"], vip, 0, []byte(fmt.Sprintf("again %d\n", i)))
	}
	var after map[string]int
	e2eenv.WaitFor(t, 5*time.Second, "servers recorded the connections", func() error {
		// A server records a connection once its echo is done, just after the client returns.
		if after = counts(); after["backend-a"]+after["backend-b"]+after["backend-c"] < 50 {
			return fmt.Errorf("%v", after)
		}
		return nil
	})
	if after["backend-c"] != before["backend-c"] {
		t.Fatalf("not-ready backend-c got new connections: %v -> %v", before, after)
	}
	if after["backend-a"]+after["backend-b"] != before["backend-a"]+before["backend-b"]+20 {
		t.Fatalf("connections lost: %v -> %v", before, after)
	}
}

func waitReady(t *testing.T, c *e2eenv.Cluster, ns string, n int) {
	t.Helper()
	e2eenv.WaitFor(t, 60*time.Second, fmt.Sprintf("%d ready endpoints", n), func() error {
		list, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=spread"})
		if err != nil {
			return err
		}
		var ready []string
		for _, s := range list.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready {
					ready = append(ready, e.Addresses...)
				}
			}
		}
		sort.Strings(ready)
		if len(ready) != n {
			return fmt.Errorf("ready endpoints %s", strings.Join(ready, ","))
		}
		return nil
	})
}
