package realnode

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/images"
)

// TestRealNodes: real kubelets register with containerd as runtime, the
// real kube-scheduler spreads a Deployment that asks for it, pods talk on
// one node and across nodes, a Job completes, kubectl logs and exec work,
// and what the kubelet writes to host paths lands in the node's own
// directory, not on the host. Its pods opt out of the mesh (the suite may
// have installed it already): this test is about the nodes.
func TestRealNodes(t *testing.T) {
	c := e2eenv.Need(t)
	ns := c.Namespace(t, "rn-basics")
	dumpOnFailure(t, c)
	img := e2eenv.Image(images.Workload)
	apply(t, c, `
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: `+ns+`}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}, annotations: {tunmesh.io/inject: disabled}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - {labelSelector: {matchLabels: {app: echo}}, topologyKey: kubernetes.io/hostname}
      containers:
      - name: echo
        image: `+img+`
        args: [echo, --listen, ":7"]
        readinessProbe: {tcpSocket: {port: 7}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: `+ns+`, annotations: {tunmesh.io/inject: disabled}}
spec:
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers:
  - {name: client, image: `+img+`, args: [sleep]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: `+ns+`}
spec:
  backoffLimit: 0
  template:
    metadata: {annotations: {tunmesh.io/inject: disabled}}
    spec:
      restartPolicy: Never
      containers:
      - {name: once, image: `+img+`, args: [exit, --code, "0", --message, job-ran-to-completion]}
`)
	kubectl(t, c, "-n", ns, "rollout", "status", "deployment/echo", "--timeout=120s")
	kubectl(t, c, "-n", ns, "wait", "--for=condition=Ready", "pod/client", "--timeout=120s")
	kubectl(t, c, "-n", ns, "wait", "--for=condition=Complete", "job/once", "--timeout=120s")

	t.Run("nodes", func(t *testing.T) {
		nodes, err := c.Client.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(nodes.Items) != len(c.State.Nodes) {
			t.Fatalf("%d nodes registered, want %d", len(nodes.Items), len(c.State.Nodes))
		}
		for _, n := range nodes.Items {
			info := n.Status.NodeInfo
			if !strings.HasPrefix(info.ContainerRuntimeVersion, "containerd://") || info.KubeletVersion != devcluster.KubernetesVersion {
				t.Errorf("%s: runtime %q kubelet %q, want containerd and %s", n.Name, info.ContainerRuntimeVersion, info.KubeletVersion, devcluster.KubernetesVersion)
			}
			if n.Spec.PodCIDR != c.PodCIDR(t, n.Name).String() {
				t.Errorf("%s: podCIDR %q, want %s", n.Name, n.Spec.PodCIDR, c.PodCIDR(t, n.Name))
			}
		}
	})

	echo := c.Pods(t, ns, "app=echo")
	byNode := map[string]string{}
	for _, p := range echo {
		byNode[p.Spec.NodeName] = p.Status.PodIP
		if !c.PodCIDR(t, p.Spec.NodeName).Contains(mustAddr(t, p.Status.PodIP)) {
			t.Errorf("pod %s on %s: IP %s outside the node's pod CIDR", p.Name, p.Spec.NodeName, p.Status.PodIP)
		}
	}
	if len(byNode) != 2 {
		t.Fatalf("kube-scheduler did not honour the anti-affinity: %v", byNode)
	}
	client := c.Pod(t, ns, "client")

	t.Run("pod to pod, same node and across nodes", func(t *testing.T) {
		netns := podNetns(t, c, client)
		for _, node := range []string{"node-1", "node-2"} {
			transfer(t, netns, net.JoinHostPort(byNode[node], "7"), 4<<20)
		}
	})

	t.Run("kubectl exec", func(t *testing.T) {
		kubectl(t, c, "-n", ns, "exec", "client", "--", "tunmesh-workload", "dial", net.JoinHostPort(byNode["node-2"], "7"), "--send", "via-exec", "--expect", "via-exec")
	})

	t.Run("kubectl logs of a completed Job", func(t *testing.T) {
		out := kubectl(t, c, "-n", ns, "logs", "job/once")
		if !strings.Contains(out, "job-ran-to-completion") {
			t.Errorf("job log %q lacks its message", out)
		}
		pods := c.Pods(t, ns, "job-name=once")
		if len(pods) != 1 || pods[0].Status.Phase != "Succeeded" {
			t.Fatalf("job pods %d, phase %v; want one Succeeded", len(pods), pods)
		}
	})

	t.Run("host paths are per node", func(t *testing.T) {
		uid := string(client.UID)
		onNode := filepath.Join(c.Cfg().Dir(), "nodes", "node-1", "real", "host", "var/lib/kubelet/pods", uid)
		if _, err := os.Stat(onNode); err != nil {
			t.Errorf("kubelet pod dir not in the node's directory: %v", err)
		}
		if _, err := os.Stat(filepath.Join("/var/lib/kubelet/pods", uid)); err == nil {
			t.Error("kubelet pod dir on the host's /var/lib/kubelet")
		}
		if _, err := os.Stat(filepath.Join(c.Cfg().Dir(), "nodes", "node-2", "real", "host", "var/lib/kubelet/pods", uid)); err == nil {
			t.Error("node-1's pod dir visible in node-2's")
		}
		logs, _ := filepath.Glob(filepath.Join(c.Cfg().Dir(), "nodes", "node-1", "real", "host", "var/log/pods", ns+"_client_*"))
		if len(logs) != 1 {
			t.Errorf("container logs of client not under node-1's /var/log/pods: %v", logs)
		}
	})
}
