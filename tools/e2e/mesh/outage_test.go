package mesh

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// TestAgentOutage: while a node's agent is down, a new pod's CNI ADD fails
// with an error naming the agent's socket (the kubelet retries) and a pod
// deleted meanwhile is torn down; when the agent returns, the new pod
// starts meshed and the vanished pod's state is gone.
func TestAgentOutage(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "mesh-outage")
	pods := c.StartPods(t, ns, e2eenv.PodSpec{Name: "doomed", SA: "doomed", Node: "node-1"})
	hold := filepath.Join(e2eenv.TestRoot, c.Name, "mesh", "node-1", devcluster.HoldFile)
	if err := os.WriteFile(hold, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(hold) })
	pid := c.AgentPID("node-1")
	if pid == 0 {
		t.Fatal("agent of node-1 not found")
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	e2eenv.WaitFor(t, 10*time.Second, "agent of node-1 gone", func() error {
		if c.AgentPID("node-1") != 0 {
			return fmt.Errorf("still running")
		}
		return nil
	})

	// A pod deleted while the agent is down is torn down anyway.
	if err := c.Client.CoreV1().Pods(ns).Delete(context.Background(), "doomed", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 30*time.Second, "doomed pod gone", func() error {
		if _, err := c.Client.CoreV1().Pods(ns).Get(context.Background(), "doomed", metav1.GetOptions{}); err == nil {
			return fmt.Errorf("still there")
		}
		return nil
	})

	// A new pod cannot be set up: the sandbox fails with the plugin's error.
	ctr := corev1.Container{Name: "main", Image: "tunmesh-workload", Args: []string{"sleep"}}
	if _, err := c.Client.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "late"},
		Spec:       corev1.PodSpec{NodeSelector: map[string]string{"kubernetes.io/hostname": "node-1"}, Containers: []corev1.Container{ctr}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 30*time.Second, "FailedCreatePodSandBox naming the agent socket", func() error {
		evs, err := c.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
			FieldSelector: fields.Set{"involvedObject.name": "late", "reason": "FailedCreatePodSandBox"}.String(),
		})
		if err != nil {
			return err
		}
		for _, ev := range evs.Items {
			if strings.Contains(ev.Message, "cni.sock") {
				return nil
			}
		}
		return fmt.Errorf("%d events, none names cni.sock", len(evs.Items))
	})

	// The agent returns: the pod is set up on the kubelet's retry, meshed.
	if err := os.Remove(hold); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 60*time.Second, "late pod running", func() error {
		if p := c.Pod(t, ns, "late"); p.Status.Phase != corev1.PodRunning {
			return fmt.Errorf("phase %s", p.Status.Phase)
		}
		return nil
	})
	late := c.Pod(t, ns, "late")
	if out, err := inNetns(c.PodNetns(late), "ip", "link", "show", "tm0"); err != nil {
		t.Fatalf("late pod not meshed: %v\n%s", err, out)
	}
	state := filepath.Join(e2eenv.TestRoot, c.Name, "mesh", "node-1", "state", "pods")
	ents, _ := os.ReadDir(state)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(state, e.Name()))
		if strings.Contains(string(b), string(pods["doomed"].UID)) || strings.Contains(string(b), `"name":"doomed"`) {
			t.Fatalf("state of the vanished pod kept: %s", e.Name())
		}
	}
}
