package e2eenv

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// PodSpec describes a test pod: it only sleeps; the test serves and dials
// from inside its network namespace.
type PodSpec struct {
	Name, SA, Node string
	Labels         map[string]string
	Annotations    map[string]string
	ReadyPort      int // tcpSocket readiness probe when non-zero
}

// StartPods creates the pods (and their ServiceAccounts) in ns and waits
// until each runs with an IP.
func (c *Cluster) StartPods(t testing.TB, ns string, specs ...PodSpec) map[string]*corev1.Pod {
	t.Helper()
	ctx := context.Background()
	for _, s := range specs {
		if s.SA != "" && s.SA != "default" {
			_, _ = c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: s.SA}}, metav1.CreateOptions{})
		}
		ctr := corev1.Container{Name: "main", Image: "tunmesh-workload", Args: []string{"sleep"}}
		if s.ReadyPort != 0 {
			ctr.ReadinessProbe = &corev1.Probe{PeriodSeconds: 1, FailureThreshold: 1,
				ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(int32(s.ReadyPort))}}}
		}
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: s.Name, Labels: s.Labels, Annotations: s.Annotations},
			Spec: corev1.PodSpec{
				ServiceAccountName: s.SA,
				NodeSelector:       map[string]string{"kubernetes.io/hostname": s.Node},
				Containers:         []corev1.Container{ctr},
			},
		}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s: %v", s.Name, err)
		}
	}
	out := map[string]*corev1.Pod{}
	for _, s := range specs {
		WaitFor(t, 60*time.Second, "pod "+s.Name+" running", func() error {
			p := c.Pod(t, ns, s.Name)
			if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				return fmt.Errorf("phase %s", p.Status.Phase)
			}
			out[s.Name] = p
			return nil
		})
	}
	return out
}
