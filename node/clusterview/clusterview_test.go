package clusterview

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// TestChangedWakesOnPodIP: a caller that did not find a pod waits on
// Changed and finds it once the kubelet reports the pod's IP (an update
// of a pod the view already had without one).
func TestChangedWakesOnPodIP(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "job"}, Status: corev1.PodStatus{Phase: corev1.PodPending}}
	client := fake.NewClientset(pod)
	v, err := New(client)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-v.SyncedC():
	case <-time.After(10 * time.Second):
		t.Fatal("view not synced")
	}
	ip := netip.MustParseAddr("10.244.1.7")
	changed := v.Changed()
	if got, err := v.PodsByAddr(ip); err != nil || len(got) != 0 {
		t.Fatalf("before the IP is reported: %v, %v", got, err)
	}
	pod = pod.DeepCopy()
	pod.Status.PodIP, pod.Status.PodIPs = ip.String(), []corev1.PodIP{{IP: ip.String()}}
	if _, err := client.CoreV1().Pods("prod").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// As the inbound check does: look, and if the pod is not there yet,
	// wait for the next change and look again. A wake-up may come from an
	// earlier event (the sync's): only the bounded loop is the contract.
	deadline := time.After(10 * time.Second)
	for {
		got, err := v.PodsByAddr(ip)
		if err == nil && len(got) == 1 && got[0].Name == "job" {
			return
		}
		select {
		case <-changed:
			changed = v.Changed()
		case <-deadline:
			t.Fatalf("pod not found by its reported IP within 10s: %v, %v", got, err)
		}
	}
}
