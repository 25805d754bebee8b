package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

func TestNodesReadyWithPodCIDRAndLease(t *testing.T) {
	c := need(t)
	out := c.Kubectl(t, "get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 nodes, got:\n%s", out)
	}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 3 || f[2] != "True" {
			t.Errorf("node not Ready: %q", l)
			continue
		}
		if want := c.PodCIDR(t, f[0]).String(); f[1] != want {
			t.Errorf("node %s podCIDR %s, want %s", f[0], f[1], want)
		}
		lease, err := c.Client.CoordinationV1().Leases("kube-node-lease").Get(context.Background(), f[0], metav1.GetOptions{})
		if err != nil {
			t.Errorf("lease of %s: %v", f[0], err)
		} else if lease.Spec.RenewTime == nil || time.Since(lease.Spec.RenewTime.Time) > time.Minute {
			t.Errorf("lease of %s not renewed recently: %v", f[0], lease.Spec.RenewTime)
		}
	}
}

// TestDeploymentServiceJob is the foundation scenario: kubectl apply a
// Deployment (2 replicas), a Service and a Job, then check addressing,
// pod-to-pod TCP on one node and across nodes, Job completion and the
// EndpointSlices the real controller-manager derives from pod readiness.
func TestDeploymentServiceJob(t *testing.T) {
	c := need(t)
	const ns = "e2e-workloads"
	c.Kubectl(t, "apply", "-f", "testdata/workloads.yaml")
	t.Cleanup(func() { _, _ = c.KubectlErr("delete", "namespace", ns, "--wait=false") })
	c.Kubectl(t, "-n", ns, "rollout", "status", "deployment/echo", "--timeout=90s")
	c.Kubectl(t, "-n", ns, "wait", "--for=condition=Complete", "job/once", "--timeout=90s")

	echo := c.Pods(t, ns, "app=echo")
	if len(echo) != 2 {
		t.Fatalf("want 2 echo pods, got %d", len(echo))
	}
	byNode := map[string]corev1.Pod{}
	for _, p := range echo {
		ip := netip.MustParseAddr(p.Status.PodIP)
		if cidr := c.PodCIDR(t, p.Spec.NodeName); !cidr.Contains(ip) {
			t.Errorf("pod %s on %s has IP %s outside the node's podCIDR %s", p.Name, p.Spec.NodeName, ip, cidr)
		}
		if !podReady(&p) {
			t.Errorf("pod %s not Ready", p.Name)
		}
		byNode[p.Spec.NodeName] = p
	}
	if len(byNode) != 2 {
		t.Fatalf("the scheduler put both replicas on one node: %v", phases(echo))
	}

	// A client pod pinned to node-1: echo on node-1 is same-node, echo on
	// node-2 is cross-node.
	c.Kubectl(t, "-n", ns, "run", "client", "--image=tunmesh-workload", "--restart=Never",
		"--overrides", `{"spec":{"nodeSelector":{"kubernetes.io/hostname":"node-1"}}}`, "--command", "--", "tunmesh-workload", "sleep")
	c.Kubectl(t, "-n", ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=60s")
	for _, node := range []string{"node-1", "node-2"} {
		target := byNode[node].Status.PodIP + ":7"
		msg := "hello " + node
		out, err := c.InPod(ns, "client", c.Workload(), "dial", target, "--send", msg)
		if err != nil || !strings.HasPrefix(out, msg) {
			t.Errorf("dial %s (%s) from node-1: %v\n%s", target, node, err, out)
		}
	}

	// The Job ran to completion; its pod Succeeded and its sandbox is gone.
	jobPods := c.Pods(t, ns, "job-name=once")
	if len(jobPods) != 1 || jobPods[0].Status.Phase != corev1.PodSucceeded {
		t.Fatalf("job pods: want one Succeeded, got %+v", phases(jobPods))
	}
	if cs := jobPods[0].Status.ContainerStatuses; len(cs) != 1 || cs[0].State.Terminated == nil || cs[0].State.Terminated.ExitCode != 0 {
		t.Errorf("job container status: %+v", cs)
	}
	waitFor(t, 10*time.Second, "job pod netns removed", func() error {
		if namedns.Exists(c.PodNetns(&jobPods[0])) {
			return fmt.Errorf("netns %s still exists", c.PodNetns(&jobPods[0]))
		}
		return nil
	})

	// EndpointSlices list exactly the ready echo pods.
	var want []string
	for _, p := range echo {
		want = append(want, p.Status.PodIP)
	}
	sort.Strings(want)
	waitFor(t, 30*time.Second, "endpointslices of echo", func() error {
		got := readyEndpoints(t, c, ns, "echo")
		if strings.Join(got, ",") != strings.Join(want, ",") {
			return fmt.Errorf("ready endpoints %v, want %v", got, want)
		}
		return nil
	})
}

func readyEndpoints(t *testing.T, c *cluster, ns, svc string) []string {
	t.Helper()
	slices, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		t.Fatalf("list endpointslices: %v", err)
	}
	var ips []string
	for _, s := range slices.Items {
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
				ips = append(ips, ep.Addresses...)
			}
		}
	}
	sort.Strings(ips)
	return ips
}

func phases(pods []corev1.Pod) []string {
	var s []string
	for _, p := range pods {
		s = append(s, p.Name+"@"+p.Spec.NodeName+"="+string(p.Status.Phase))
	}
	return s
}
