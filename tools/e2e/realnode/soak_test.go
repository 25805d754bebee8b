package realnode

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/images"
)

// TestCronJobSoak runs a CronJob calling a meshed Service every minute for
// ten minutes and asserts the agents' goroutines, fds, NICs (meshed pods)
// and memory end within a bound of where they started. It takes over ten
// minutes, so it runs only with TUNMESH_E2E_SOAK=1 (make soak); the suite's
// jobLoop step is the short in-suite variant.
func TestCronJobSoak(t *testing.T) {
	if os.Getenv("TUNMESH_E2E_SOAK") != "1" {
		t.Skip("set TUNMESH_E2E_SOAK=1 (make soak) to run the 10-minute CronJob soak")
	}
	c := e2eenv.Need(t)
	dumpOnFailure(t, c)
	if _, err := c.Client.AppsV1().DaemonSets("tunmesh").Get(context.Background(), "tunmesh-node", metav1.GetOptions{}); err != nil {
		install(t, c)
	}
	ns := c.Namespace(t, "rn-soak")
	img := e2eenv.Image(images.Workload)
	apply(t, c, `
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: `+ns+`}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: `+ns+`, labels: {app: echo}}
spec:
  nodeSelector: {kubernetes.io/hostname: node-2}
  containers:
  - {name: echo, image: `+img+`, args: [echo, --listen, ":7"]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: `+ns+`}
spec:
  selector: {app: echo}
  ports: [{port: 7, targetPort: 7}]
`)
	kubectl(t, c, "-n", ns, "wait", "--for=condition=Ready", "pod/server", "--timeout=120s")
	base := map[string]agentStats{}
	for _, n := range c.State.Nodes {
		base[n.Name] = readAgentStats(t, c, n.Name)
	}
	apply(t, c, fmt.Sprintf(`
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick, namespace: %s}
spec:
  schedule: "* * * * *"
  successfulJobsHistoryLimit: 1
  failedJobsHistoryLimit: 10
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:%s
`, ns, callSpec(img, "client", "          ")))
	time.Sleep(10*time.Minute + 30*time.Second)
	kubectl(t, c, "-n", ns, "delete", "cronjob", "tick", "--wait=true")
	jobs, err := c.Client.BatchV1().Jobs(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, j := range jobs.Items {
		if j.Status.Failed > 0 {
			t.Errorf("job %s failed", j.Name)
		}
	}
	checkBounded(t, c, base)
}
