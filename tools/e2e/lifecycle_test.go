package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

func TestRestartPoliciesProbesAndInit(t *testing.T) {
	c := need(t)
	ns := c.Namespace(t, "e2e-lifecycle")
	c.Kubectl(t, "-n", ns, "apply", "-f", "testdata/lifecycle.yaml")

	containerStatus := func(name string) (*corev1.Pod, corev1.ContainerStatus) {
		p := c.Pod(t, ns, name)
		if len(p.Status.ContainerStatuses) == 0 {
			return p, corev1.ContainerStatus{}
		}
		return p, p.Status.ContainerStatuses[0]
	}

	t.Run("OnFailure restarts with backoff", func(t *testing.T) {
		waitFor(t, 30*time.Second, "onfailure restarted twice", func() error {
			p, cs := containerStatus("onfailure")
			if cs.RestartCount < 2 {
				return fmt.Errorf("restartCount %d, phase %s", cs.RestartCount, p.Status.Phase)
			}
			if t := cs.LastTerminationState.Terminated; t == nil || t.ExitCode != 3 {
				return fmt.Errorf("last termination %+v", cs.LastTerminationState)
			}
			return nil
		})
	})
	t.Run("Never fails the pod", func(t *testing.T) {
		waitFor(t, 20*time.Second, "never-fails Failed", func() error {
			p, cs := containerStatus("never-fails")
			if p.Status.Phase != corev1.PodFailed || cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 7 || cs.RestartCount != 0 {
				return fmt.Errorf("phase %s, status %+v", p.Status.Phase, cs)
			}
			return nil
		})
	})
	t.Run("readiness httpGet and exec liveness", func(t *testing.T) {
		c.Kubectl(t, "-n", ns, "wait", "--for=condition=Ready", "pod/probed", "--timeout=30s")
		time.Sleep(3 * time.Second) // several liveness periods
		if _, cs := containerStatus("probed"); cs.RestartCount != 0 || !cs.Ready {
			t.Fatalf("healthy pod restarted or not ready: %+v", cs)
		}
	})
	t.Run("failing liveness restarts the container", func(t *testing.T) {
		waitFor(t, 40*time.Second, "unhealthy restarted", func() error {
			_, cs := containerStatus("unhealthy")
			if cs.RestartCount < 1 {
				return fmt.Errorf("restartCount %d", cs.RestartCount)
			}
			return nil
		})
	})
	t.Run("init container then main with env", func(t *testing.T) {
		waitFor(t, 30*time.Second, "with-init Succeeded", func() error {
			p := c.Pod(t, ns, "with-init")
			if p.Status.Phase != corev1.PodSucceeded {
				return fmt.Errorf("phase %s", p.Status.Phase)
			}
			return nil
		})
		p := c.Pod(t, ns, "with-init")
		if ics := p.Status.InitContainerStatuses; len(ics) != 1 || ics[0].State.Terminated == nil || ics[0].State.Terminated.ExitCode != 0 {
			t.Fatalf("init container status: %+v", ics)
		}
		logDir := filepath.Join(testRoot, c.Name, "nodes", p.Spec.NodeName, "kubelet", "pods", ns+"_with-init_"+string(p.UID))
		b, err := os.ReadFile(filepath.Join(logDir, "main.log"))
		if err != nil {
			t.Fatalf("read container log: %v", err)
		}
		if want := "pod=with-init ip=" + p.Status.PodIP; !strings.Contains(string(b), want) {
			t.Errorf("main container log %q does not contain %q", b, want)
		}
	})
	t.Run("unresolvable command is reported", func(t *testing.T) {
		waitFor(t, 20*time.Second, "bad-command waiting with RunContainerError", func() error {
			p, cs := containerStatus("bad-command")
			if cs.State.Waiting == nil || cs.State.Waiting.Reason != "RunContainerError" || !strings.Contains(cs.State.Waiting.Message, "no-such-binary-anywhere") {
				return fmt.Errorf("phase %s, status %+v", p.Status.Phase, cs)
			}
			return nil
		})
	})
}

// TestDeleteRemovesSandbox: deleting a pod stops its processes, releases
// its IP (CNI DEL through host-local) and removes its network namespace.
func TestDeleteRemovesSandbox(t *testing.T) {
	c := need(t)
	ns := c.Namespace(t, "e2e-delete")
	c.Kubectl(t, "-n", ns, "run", "victim", "--image=tunmesh-workload", "--restart=Never", "--command", "--", "tunmesh-workload", "sleep")
	c.Kubectl(t, "-n", ns, "wait", "--for=condition=Ready", "pod/victim", "--timeout=60s")
	p := c.Pod(t, ns, "victim")
	netns := c.PodNetns(p)
	pids, err := namedns.Pids(netns)
	if err != nil || len(pids) == 0 {
		t.Fatalf("pod netns %s: pids %v, err %v", netns, pids, err)
	}
	ipamFile := filepath.Join(testRoot, c.Name, "nodes", p.Spec.NodeName, "cni", "ipam", "tunmesh-dev", p.Status.PodIP)
	if _, err := os.Stat(ipamFile); err != nil {
		t.Fatalf("host-local reservation for %s: %v", p.Status.PodIP, err)
	}

	c.Kubectl(t, "-n", ns, "delete", "pod", "victim", "--timeout=60s")
	if _, err := c.Client.CoreV1().Pods(ns).Get(context.Background(), "victim", metav1.GetOptions{}); err == nil {
		t.Fatalf("pod still exists after delete")
	}
	if namedns.Exists(netns) {
		t.Errorf("netns %s still exists", netns)
	}
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if len(b) > 0 {
				t.Errorf("process %d (%q) still running", pid, b)
			}
		}
	}
	if _, err := os.Stat(ipamFile); err == nil {
		t.Errorf("IP %s still reserved in %s", p.Status.PodIP, ipamFile)
	}
}

func TestDevExecNode(t *testing.T) {
	c := need(t)
	out, err := c.Ctl("dev", "exec", "--node", "node-1", "--", "ip", "route")
	if err != nil {
		t.Fatalf("dev exec --node: %v\n%s", err, out)
	}
	// host-gw: node-1 routes node-2's pod CIDR via node-2's underlay address.
	want := c.PodCIDR(t, "node-2").String() + " via " + c.State.Nodes[1].IP
	if !strings.Contains(out, want) {
		t.Errorf("node-1 routes lack %q:\n%s", want, out)
	}
	if out, err := c.Ctl("dev", "exec", "--node", "no-such-node", "--", "true"); err == nil {
		t.Errorf("dev exec on a missing node succeeded:\n%s", out)
	}
	if out, err := c.Ctl("dev", "exec", "--node", "node-1", "--", "sh", "-c", "exit 5"); err == nil || !strings.Contains(err.Error(), "exit status 5") {
		t.Errorf("exit code not propagated: %v\n%s", err, out)
	}
}
