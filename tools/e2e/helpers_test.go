package e2e

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// kubectl runs the cluster's kubectl and fails the test on error.
func (c *cluster) kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := c.kubectlErr(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *cluster) kubectlErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.kubectlBin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.state.Kubeconfig)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// ctl runs tunmeshctl against the shared cluster and returns its combined
// output and exit error.
func (c *cluster) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	full := append([]string{args[0], args[1], "--name", c.name, "--root", testRoot}, args[2:]...)
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, "tunmeshctl"), full...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// workload is the path of tunmesh-workload, usable inside pod namespaces
// (they share the host's filesystem).
func (c *cluster) workload() string { return filepath.Join(c.binDir, "tunmesh-workload") }

// inPod runs argv in the pod's network namespace through `dev exec`.
func (c *cluster) inPod(ns, pod string, argv ...string) (string, error) {
	return c.ctl(append([]string{"dev", "exec", pod, "-n", ns, "--"}, argv...)...)
}

// waitFor polls try until it returns nil or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, try func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = try(); err == nil {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
}

func (c *cluster) pods(t *testing.T, ns, selector string) []corev1.Pod {
	t.Helper()
	list, err := c.client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatalf("list pods %s in %s: %v", selector, ns, err)
	}
	return list.Items
}

func (c *cluster) pod(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	return p
}

func (c *cluster) podCIDR(t *testing.T, node string) netip.Prefix {
	t.Helper()
	for _, n := range c.state.Nodes {
		if n.Name == node {
			return netip.MustParsePrefix(n.PodCIDR)
		}
	}
	t.Fatalf("no node %q in cluster state", node)
	return netip.Prefix{}
}

func (c *cluster) podNetns(p *corev1.Pod) string {
	return c.cfg().PodNetnsPrefix() + string(p.UID)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// namespace creates a namespace for one test and deletes it afterwards.
func (c *cluster) namespace(t *testing.T, name string) string {
	t.Helper()
	_, err := c.client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = c.client.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	// Pods need the namespace's default ServiceAccount (made by the controller).
	waitFor(t, 30*time.Second, "default service account in "+name, func() error {
		_, err := c.client.CoreV1().ServiceAccounts(name).Get(context.Background(), "default", metav1.GetOptions{})
		return err
	})
	return name
}
