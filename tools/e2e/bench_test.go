package e2e

import (
	"context"
	"fmt"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/identity/api"
	"k8s.io/apimachinery/pkg/util/wait"
)

// BenchmarkPodStartup measures, on the local cluster, the time from
// creating a pod (already bound, as after scheduling) to its Ready
// condition: sandbox namespace, CNI ADD through libcni (bridge +
// host-local), process start, status update. Deletion to the object being
// gone is reported too. Medians, since the machine is shared.
func BenchmarkPodStartup(b *testing.B) {
	if e2eenv.Current() == nil {
		b.Skip("needs root and a local cluster")
	}
	c := e2eenv.Current()
	ctx := context.Background()
	ns := "e2e-bench-" + randomSuffix() // the benchmark function runs once per b.N
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	defer c.Client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}) //nolint:errcheck
	if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := c.Client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	}); err != nil {
		b.Fatal(err)
	}
	var ready, gone []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("bench-%d", i)
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{
				NodeName:                      "node-1",
				TerminationGracePeriodSeconds: new(int64),
				Containers: []corev1.Container{{
					Name: "sleep", Image: "tunmesh-workload", Args: []string{"sleep"},
				}},
			},
		}
		start := time.Now()
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := wait.PollUntilContextTimeout(ctx, 5*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			p, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			return err == nil && podReady(p), nil
		}); err != nil {
			b.Fatalf("pod %s not ready: %v", name, err)
		}
		ready = append(ready, time.Since(start))
		start = time.Now()
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := wait.PollUntilContextTimeout(ctx, 5*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			_, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			return err != nil, nil
		}); err != nil {
			b.Fatalf("pod %s not deleted: %v", name, err)
		}
		gone = append(gone, time.Since(start))
	}
	b.StopTimer()
	b.ReportMetric(float64(median(ready).Milliseconds()), "ms-to-ready(p50)")
	b.ReportMetric(float64(median(gone).Milliseconds()), "ms-to-gone(p50)")
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkIdentityCertify measures issuance through the whole path: TLS
// to tunmesh-identity, TokenReview of the agent token at the API server
// (cached per token after the first request), node authorization, CSR
// checks and signing. "sequential" reports the latency of one client
// (p50); "parallel" runs 4×GOMAXPROCS clients and reports certs/s.
func BenchmarkIdentityCertify(b *testing.B) {
	if e2eenv.Current() == nil {
		b.Skip("needs root and a local cluster")
	}
	e := identity(b)
	client := e.client(b, e.token(b, controlNS, "tunmesh-node", e.agentPods["node-1"], api.Audience))
	csrDER := csr(b)
	b.Run("sequential", func(b *testing.B) {
		lat := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			start := time.Now()
			if _, err := client.Certify(context.Background(), e.web, csrDER); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		b.ReportMetric(float64(median(lat).Microseconds())/1000, "ms(p50)")
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(4)
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := client.Certify(context.Background(), e.web, csrDER); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "certs/s")
	})
}
