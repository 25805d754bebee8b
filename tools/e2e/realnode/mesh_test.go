package realnode

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/images"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

const marker = "TUNMESH-PLAINTEXT-MARKER-0123456789"

// TestMeshOnRealNodes installs tunmesh as a user does and walks through
// its life on real nodes: DaemonSet ready everywhere, meshed cross-node
// transfers with TLS only on the underlay, Jobs and a CronJob that call a
// meshed Service and complete, an agent pod deleted and a DaemonSet
// rolled to a new tag without restarting workloads, and uninstall leaving
// the primary's conflists and working (plaintext) pods. The steps depend
// on the install only.
func TestMeshOnRealNodes(t *testing.T) {
	c := e2eenv.Need(t)
	dumpOnFailure(t, c)
	primary := conflists(t, c)

	// Only install is a prerequisite of the later steps; each other step
	// stands on its own, so one failure does not hide the others.
	if !t.Run("install", func(t *testing.T) { install(t, c) }) {
		t.FailNow()
	}
	step := func(name string, fn func(t *testing.T)) { t.Run(name, fn) }

	ns := c.Namespace(t, "rn-mesh")
	img := e2eenv.Image(images.Workload)
	apply(t, c, `
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: `+ns+`}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: `+ns+`}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: `+ns+`, labels: {app: echo}}
spec:
  serviceAccountName: server
  nodeSelector: {kubernetes.io/hostname: node-2}
  containers:
  - name: echo
    image: `+img+`
    args: [echo, --listen, ":7"]
    readinessProbe: {tcpSocket: {port: 7}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: `+ns+`}
spec:
  selector: {app: echo}
  ports: [{port: 7, targetPort: 7}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: `+ns+`}
spec:
  serviceAccountName: client
  nodeSelector: {kubernetes.io/hostname: node-1}
  containers:
  - {name: client, image: `+img+`, args: [sleep]}
`)
	kubectl(t, c, "-n", ns, "wait", "--for=condition=Ready", "pod/server", "pod/client", "--timeout=120s")
	svc, err := c.Client.CoreV1().Services(ns).Get(context.Background(), "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	server := c.Pod(t, ns, "server").Status.PodIP
	targets := []string{net.JoinHostPort(server, "7"), net.JoinHostPort(svc.Spec.ClusterIP, "7")}
	meshed := func(t *testing.T) {
		netns := podNetns(t, c, c.Pod(t, ns, "client"))
		for _, dst := range targets {
			transfer(t, netns, dst, 8<<20)
			pcap := e2eenv.CaptureUnderlay(t, c, "tcp.dstport == 4143 && tls.app_data", func() { transferPayload(t, netns, dst, []byte(strings.Repeat(marker, 256))) })
			if raw, _ := os.ReadFile(pcap); strings.Contains(string(raw), marker) {
				t.Fatalf("-> %s: marker in clear on the underlay", dst)
			}
		}
	}
	step("meshed transfer across nodes, TLS only on the underlay", meshed)

	step("Job calling a meshed Service completes", func(t *testing.T) { runJobs(t, c, ns, "call", "client", 1) })
	step("Job whose first instruction is a meshed call (no certificate yet)", func(t *testing.T) {
		apply(t, c, "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: fresh, namespace: "+ns+"}\n")
		runJobs(t, c, ns, "first", "fresh", 1)
	})
	step("CronJob calling a meshed Service completes", func(t *testing.T) { cronJob(t, c, ns) })
	step("many Job runs leave the agent bounded", func(t *testing.T) { jobLoop(t, c, ns, 12) })

	restarts := func(t *testing.T) map[string]string {
		ids := map[string]string{}
		for _, name := range []string{"server", "client"} {
			p := c.Pod(t, ns, name)
			ids[name] = p.Status.ContainerStatuses[0].ContainerID + "/" + strconv.Itoa(int(p.Status.ContainerStatuses[0].RestartCount))
		}
		return ids
	}
	before := restarts(t)
	step("agent pod deleted: recreated, pods untouched, new connections meshed", func(t *testing.T) {
		agents := c.Pods(t, "tunmesh", "app=tunmesh-node")
		for _, a := range agents {
			if a.Spec.NodeName == "node-2" {
				kubectl(t, c, "-n", "tunmesh", "delete", "pod", a.Name, "--wait=true")
			}
		}
		kubectl(t, c, "-n", "tunmesh", "rollout", "status", "daemonset/tunmesh-node", "--timeout=180s")
		if got := restarts(t); fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("workload containers changed: %v -> %v", before, got)
		}
		meshed(t)
	})
	step("DaemonSet rolled to a new tag: pods untouched, new connections meshed", func(t *testing.T) {
		const tag = "e2e-roll"
		c.TagImage(t, e2eenv.Image(images.Node), images.Ref(e2eenv.ImageRegistry, images.Node, tag))
		c.TagImage(t, e2eenv.Image(images.CNI), images.Ref(e2eenv.ImageRegistry, images.CNI, tag))
		kubectl(t, c, "-n", "tunmesh", "set", "image", "daemonset/tunmesh-node",
			"agent="+images.Ref(e2eenv.ImageRegistry, images.Node, tag), "cni-install="+images.Ref(e2eenv.ImageRegistry, images.CNI, tag))
		kubectl(t, c, "-n", "tunmesh", "rollout", "status", "daemonset/tunmesh-node", "--timeout=300s")
		if got := restarts(t); fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("workload containers changed: %v -> %v", before, got)
		}
		meshed(t)
	})
	step("uninstall: conflists back to the primary's, pods still talk", func(t *testing.T) {
		out, err := ctl(c, "uninstall") // needs no cluster access
		if err != nil {
			t.Fatalf("tunmeshctl uninstall: %v\n%s", err, out)
		}
		cmd := exec.Command(c.KubectlBin, "--kubeconfig", c.State.Kubeconfig, "delete", "--ignore-not-found", "--wait=true", "--timeout=180s", "-f", "-")
		cmd.Stdin = strings.NewReader(out)
		if o, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("kubectl delete: %v\n%s", err, o)
		}
		e2eenv.WaitFor(t, 2*time.Minute, "conflists back to the primary's", func() error {
			now := conflists(t, c)
			for node, want := range primary {
				if !sameJSON(now[node], want) {
					return fmt.Errorf("%s: %s", node, now[node])
				}
			}
			return nil
		})
		if got := restarts(t); fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("workload containers changed: %v -> %v", before, got)
		}
		transfer(t, podNetns(t, c, c.Pod(t, ns, "client")), targets[0], 1<<20)
	})
}

// install runs `tunmeshctl install | kubectl apply -f -` with the images
// this run built and waits until the DaemonSet is ready on every node and
// every node's conflist chains tunmesh-cni.
func install(t *testing.T, c *e2eenv.Cluster) {
	start := time.Now()
	out, err := ctl(c, "install", "--registry", e2eenv.ImageRegistry, "--tag", e2eenv.ImageTag)
	if err != nil {
		t.Fatalf("tunmeshctl install: %v\n%s", err, out)
	}
	apply(t, c, out)
	kubectl(t, c, "-n", "tunmesh", "rollout", "status", "deployment/tunmesh-identity", "--timeout=180s")
	kubectl(t, c, "-n", "tunmesh", "rollout", "status", "daemonset/tunmesh-node", "--timeout=180s")
	ds, err := c.Client.AppsV1().DaemonSets("tunmesh").Get(context.Background(), "tunmesh-node", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if int(ds.Status.NumberReady) != len(c.State.Nodes) {
		t.Fatalf("DaemonSet ready on %d of %d nodes", ds.Status.NumberReady, len(c.State.Nodes))
	}
	e2eenv.WaitFor(t, time.Minute, "tunmesh-cni chained on every node", func() error {
		for node, conf := range conflists(t, c) {
			if !strings.Contains(conf, `"tunmesh-cni"`) {
				return fmt.Errorf("%s: %s", node, conf)
			}
		}
		return nil
	})
	t.Logf("install to ready: %s", time.Since(start).Round(100*time.Millisecond))
}

// conflists reads every node's primary conflist.
func conflists(t testing.TB, c *e2eenv.Cluster) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range c.State.Nodes {
		b, err := os.ReadFile(filepath.Join(n.CNIConf, "10-bridge.conflist"))
		if err != nil {
			t.Fatalf("conflist of %s: %v", n.Name, err)
		}
		out[n.Name] = string(b)
	}
	return out
}

func sameJSON(a, b string) bool {
	var x, y any
	if json.Unmarshal([]byte(a), &x) != nil || json.Unmarshal([]byte(b), &y) != nil {
		return false
	}
	return fmt.Sprint(x) == fmt.Sprint(y)
}

// callSpec is a pod template whose container's first (and only) act is a
// call to the meshed echo Service through its ClusterIP (service env vars:
// the local cluster has no DNS), then exit 0.
// indent is the pod spec's indentation in the manifest.
func callSpec(img, sa, indent string) string {
	return strings.ReplaceAll(`
serviceAccountName: `+sa+`
restartPolicy: Never
containers:
- name: call
  image: `+img+`
  args: [dial, "$(ECHO_SERVICE_HOST):7", --send, job-call, --expect, job-call, --timeout, 30s]`, "\n", "\n"+indent)
}

// runJobs runs a Job of n completions whose pods call the Service, and
// checks each pod is Completed (Succeeded, no annotation or hook needed).
func runJobs(t *testing.T, c *e2eenv.Cluster, ns, name, sa string, n int) {
	t.Helper()
	img := e2eenv.Image(images.Workload)
	apply(t, c, fmt.Sprintf(`
apiVersion: batch/v1
kind: Job
metadata: {name: %s, namespace: %s}
spec:
  completions: %d
  parallelism: 2
  backoffLimit: 0
  template:
    spec:%s
`, name, ns, n, callSpec(img, sa, "      ")))
	waitJob(t, c, ns, name, n)
	pods := c.Pods(t, ns, "job-name="+name)
	if len(pods) != n {
		t.Fatalf("job %s: %d pods, want %d", name, len(pods), n)
	}
	for _, p := range pods {
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("job pod %s: phase %s, want Succeeded", p.Name, p.Status.Phase)
		}
		for k := range p.Annotations {
			if strings.Contains(k, "tunmesh") || strings.Contains(k, "linkerd") {
				t.Errorf("job pod %s carries annotation %s", p.Name, k)
			}
		}
	}
}

// cronJob runs a CronJob every minute until one run has succeeded.
func cronJob(t *testing.T, c *e2eenv.Cluster, ns string) {
	img := e2eenv.Image(images.Workload)
	apply(t, c, fmt.Sprintf(`
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick, namespace: %s}
spec:
  schedule: "* * * * *"
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:%s
`, ns, callSpec(img, "client", "          ")))
	defer kubectl(t, c, "-n", ns, "delete", "cronjob", "tick", "--wait=false")
	failed := ""
	e2eenv.WaitFor(t, 150*time.Second, "a successful CronJob run", func() error {
		cj, err := c.Client.BatchV1().CronJobs(ns).Get(context.Background(), "tick", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cj.Status.LastSuccessfulTime != nil {
			return nil
		}
		jobs, err := c.Client.BatchV1().Jobs(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, j := range jobs.Items {
			if strings.HasPrefix(j.Name, "tick-") && j.Status.Failed > 0 {
				failed = j.Name
				return nil
			}
		}
		return fmt.Errorf("no successful run yet (active %d)", len(cj.Status.Active))
	})
	if failed != "" {
		waitJob(t, c, ns, failed, 1) // fails with the pod's log
	}
}

// agentStats are the agent figures a leak would grow.
type agentStats struct{ goroutines, fds, rssMiB, pods float64 }

func readAgentStats(t *testing.T, c *e2eenv.Cluster, node string) agentStats {
	t.Helper()
	m := agentMetrics(t, c, node)
	need := func(name string) float64 {
		v, ok := m[name]
		if !ok {
			t.Fatalf("agent of %s exports no %s", node, name)
		}
		return v
	}
	return agentStats{
		goroutines: need("go_goroutines"),
		fds:        need("process_open_fds"),
		rssMiB:     need("process_resident_memory_bytes") / (1 << 20),
		pods:       need("tunmesh_node_meshed_pods"),
	}
}

// agentMetrics reads the unlabelled samples of the agent's /metrics.
func agentMetrics(t *testing.T, c *e2eenv.Cluster, node string) map[string]float64 {
	t.Helper()
	var ip, netns string
	for _, n := range c.State.Nodes {
		if n.Name == node {
			ip, netns = n.IP, n.Netns
		}
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(netns)}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + net.JoinHostPort(ip, "4191") + "/metrics")
	if err != nil {
		t.Fatalf("metrics of the agent on %s: %v", node, err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 || strings.HasPrefix(f[0], "#") || strings.Contains(f[0], "{") {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			out[f[0]] = v
		}
	}
	return out
}

// jobLoop runs n one-pod Jobs one after another (the in-suite stand-in for
// a CronJob every minute for ten minutes; TestCronJobSoak is the real
// thing) and asserts that the agents end where they started: meshed pods
// back to the baseline, goroutines, fds and memory within a bound.
func jobLoop(t *testing.T, c *e2eenv.Cluster, ns string, n int) {
	base := map[string]agentStats{}
	for _, node := range c.State.Nodes {
		base[node.Name] = readAgentStats(t, c, node.Name)
	}
	for i := range n {
		runJobs(t, c, ns, "loop-"+strconv.Itoa(i), "client", 1)
	}
	checkBounded(t, c, base)
}

func checkBounded(t *testing.T, c *e2eenv.Cluster, base map[string]agentStats) {
	t.Helper()
	e2eenv.WaitFor(t, time.Minute, "agents back to their baseline", func() error {
		for _, node := range c.State.Nodes {
			b, now := base[node.Name], readAgentStats(t, c, node.Name)
			switch {
			case now.pods > b.pods:
				return fmt.Errorf("%s: %v meshed pods, baseline %v (NICs not released)", node.Name, now.pods, b.pods)
			case now.goroutines > b.goroutines+20:
				return fmt.Errorf("%s: %v goroutines, baseline %v", node.Name, now.goroutines, b.goroutines)
			case now.fds > b.fds+10:
				return fmt.Errorf("%s: %v fds, baseline %v", node.Name, now.fds, b.fds)
			case now.rssMiB > b.rssMiB+40:
				return fmt.Errorf("%s: %.0f MiB resident, baseline %.0f", node.Name, now.rssMiB, b.rssMiB)
			}
			t.Logf("%s: goroutines %v -> %v, fds %v -> %v, rss %.1f -> %.1f MiB, meshed pods %v -> %v",
				node.Name, b.goroutines, now.goroutines, b.fds, now.fds, b.rssMiB, now.rssMiB, b.pods, now.pods)
		}
		return nil
	})
}

// waitJob waits until the Job has n successful pods, and fails at once
// (with the failed pods' logs) when one fails.
func waitJob(t *testing.T, c *e2eenv.Cluster, ns, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		j, err := c.Client.BatchV1().Jobs(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if j.Status.Failed > 0 {
			for _, p := range c.Pods(t, ns, "job-name="+name) {
				if p.Status.Phase == corev1.PodFailed {
					out, _ := c.KubectlErr("-n", ns, "logs", p.Name)
					t.Logf("failed pod %s on %s:\n%s", p.Name, p.Spec.NodeName, out)
				}
			}
			t.Fatalf("job %s: %d pods failed", name, j.Status.Failed)
		}
		if int(j.Status.Succeeded) >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s: %d of %d succeeded after 3m", name, j.Status.Succeeded, n)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
