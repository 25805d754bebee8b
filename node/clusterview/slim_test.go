package clusterview

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/node/policy"
)

// benchPod is a pod as the API server returned it (kubectl get -o json
// --show-managed-fields; a tunmesh-bench memory pod), with the fields
// the agent reads filled in as a meshed pod would have them.
func benchPod(t testing.TB) *corev1.Pod {
	t.Helper()
	b, err := os.ReadFile("testdata/pod-bench.json")
	if err != nil {
		t.Fatal(err)
	}
	var p corev1.Pod
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	if len(p.ManagedFields) == 0 || len(p.Spec.Containers) == 0 {
		t.Fatal("testdata pod lacks managedFields or containers")
	}
	return &p
}

// TestSlimPodKeepsWhatTheAgentReads lists every pod field read through the
// view (outbound and inbound decisions, pods' reconcile, policy.For) and
// checks slimPod keeps it, and that what it drops is gone.
func TestSlimPodKeepsWhatTheAgentReads(t *testing.T) {
	p := benchPod(t)
	now := metav1.Now()
	p.DeletionTimestamp = &now
	p.Annotations = map[string]string{"tunmesh.io/inject": "enabled", lastApplied: `{"huge":"copy"}`}
	p.OwnerReferences = []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "rs"}}
	p.Status.HostIPs = []corev1.HostIP{{IP: "10.250.0.11"}}
	p.Spec.HostNetwork = true
	p.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}

	s := slimPod(p)
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"Name", s.Name, p.Name},
		{"Namespace", s.Namespace, p.Namespace},
		{"UID", s.UID, p.UID},
		{"ResourceVersion", s.ResourceVersion, p.ResourceVersion},
		{"Labels", s.Labels, p.Labels},
		{"OwnerReferences", s.OwnerReferences, p.OwnerReferences},
		{"DeletionTimestamp", s.DeletionTimestamp, p.DeletionTimestamp},
		{"Spec.NodeName", s.Spec.NodeName, p.Spec.NodeName},
		{"Spec.ServiceAccountName", s.Spec.ServiceAccountName, p.Spec.ServiceAccountName},
		{"Spec.HostNetwork", s.Spec.HostNetwork, p.Spec.HostNetwork},
		{"Status.Phase", s.Status.Phase, p.Status.Phase},
		{"Status.PodIP", s.Status.PodIP, p.Status.PodIP},
		{"Status.PodIPs", s.Status.PodIPs, p.Status.PodIPs},
		{"Status.HostIP", s.Status.HostIP, p.Status.HostIP},
		{"Status.HostIPs", s.Status.HostIPs, p.Status.HostIPs},
		{"Annotations", s.Annotations, map[string]string{"tunmesh.io/inject": "enabled"}},
		{"Spec.Containers[0].Ports", s.Spec.Containers[0].Ports, p.Spec.Containers[0].Ports},
		{"Spec.Containers[0].Name", s.Spec.Containers[0].Name, p.Spec.Containers[0].Name},
	} {
		gj, _ := json.Marshal(c.got)
		wj, _ := json.Marshal(c.want)
		if string(gj) != string(wj) {
			t.Errorf("%s: got %s, want %s", c.name, gj, wj)
		}
	}
	if s.ManagedFields != nil || s.Status.Conditions != nil || s.Status.ContainerStatuses != nil {
		t.Errorf("slim pod kept managedFields or conditions: %+v", s)
	}
	// Containers keep their name and ports only.
	if len(s.Spec.Containers) != 1 || s.Spec.Containers[0].Image != "" || s.Spec.Containers[0].Env != nil ||
		s.Spec.Containers[0].Resources.Requests != nil || s.Spec.Containers[0].VolumeMounts != nil {
		t.Errorf("slim pod kept more of its containers than names and ports: %+v", s.Spec.Containers)
	}
	if _, ok := p.Annotations[lastApplied]; !ok {
		t.Error("slimPod changed the original's annotations")
	}
	// Probes keep their port only (the node's probes are let through to
	// those ports: authz.ProbePort); a container with only a probe stays.
	withProbe := benchPod(t)
	withProbe.Spec.Containers[0].Ports = nil
	withProbe.Spec.Containers[0].ReadinessProbe = &corev1.Probe{PeriodSeconds: 3,
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("health")}}}
	withProbe.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}
	sp := slimPod(withProbe)
	if len(sp.Spec.Containers) != 1 || sp.Spec.Containers[0].ReadinessProbe == nil ||
		sp.Spec.Containers[0].ReadinessProbe.HTTPGet.Port != intstr.FromString("health") ||
		sp.Spec.Containers[0].ReadinessProbe.HTTPGet.Path != "" || sp.Spec.Containers[0].ReadinessProbe.PeriodSeconds != 0 ||
		sp.Spec.Containers[0].LivenessProbe != nil {
		t.Errorf("slim probes: %+v, want the readiness probe's port only", sp.Spec.Containers)
	}
	// Idempotent, as a TransformFunc should be.
	if again := slimPod(s); again.Name != s.Name || again.Status.PodIP != s.Status.PodIP {
		t.Errorf("slimming twice lost fields: %+v", again)
	}

	// The policy comes out the same from the slim pod.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: p.Namespace, Annotations: map[string]string{"tunmesh.io/inject": "enabled"}}}
	p.Spec.HostNetwork, s.Spec.HostNetwork = false, false
	full, _ := policy.Config{}.For(p, ns)
	slimmed, _ := policy.Config{}.For(s, slimNamespace(ns))
	if !reflect.DeepEqual(full, slimmed) {
		t.Errorf("policy from slim pod %+v, from full pod %+v", slimmed, full)
	}
}

func TestSlimPassesOtherObjects(t *testing.T) {
	tomb := cache.DeletedFinalStateUnknown{Key: "a/b", Obj: &corev1.Pod{}}
	got, err := slim(tomb)
	if err != nil || got != any(tomb) {
		t.Errorf("tombstone: got %v, %v", got, err)
	}
	ns, err := slim(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x", ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
		Spec: corev1.NamespaceSpec{Finalizers: []corev1.FinalizerName{"kubernetes"}}})
	if n, ok := ns.(*corev1.Namespace); err != nil || !ok || n.Name != "x" || n.ManagedFields != nil || n.Spec.Finalizers != nil {
		t.Errorf("namespace: got %+v, %v", ns, err)
	}
}

// TestViewServesSlimPods: pods looked up through the view come from the
// transformed cache and still carry what lookups need.
func TestViewServesSlimPods(t *testing.T) {
	p := benchPod(t)
	client := fake.NewClientset(p)
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
		t.Fatal("not synced")
	}
	got, err := v.PodByAddr(netip.MustParseAddr(p.Status.PodIP))
	if err != nil || got == nil {
		t.Fatalf("PodByAddr(%s) = %v, %v", p.Status.PodIP, got, err)
	}
	if got.Name != p.Name || got.Spec.NodeName != p.Spec.NodeName || ServiceAccount(got) != ServiceAccount(p) {
		t.Errorf("looked-up pod %s/%s on %q sa %q", got.Namespace, got.Name, got.Spec.NodeName, ServiceAccount(got))
	}
	if got.ManagedFields != nil {
		t.Error("the view's cache holds full pods")
	}
	for _, c := range got.Spec.Containers {
		if c.Image != "" || c.Command != nil || c.Env != nil || c.Resources.Requests != nil || len(c.Ports) == 0 {
			t.Errorf("cached container %+v holds more than its name and ports", c)
		}
	}
}

// retained is the heap n objects made by mk hold once garbage is gone.
func retained(n int, mk func(i int) any) float64 {
	keep := make([]any, n)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range keep {
		keep[i] = mk(i)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(keep)
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
}

// decodePods decodes the captured pod n times (as the informer would), so
// that each copy holds its own strings.
func decodePods(t testing.TB, n int) []*corev1.Pod {
	b, err := os.ReadFile("testdata/pod-bench.json")
	if err != nil {
		t.Fatal(err)
	}
	out := make([]*corev1.Pod, n)
	for i := range out {
		var p corev1.Pod
		if err := json.Unmarshal(b, &p); err != nil {
			t.Fatal(err)
		}
		out[i] = &p
	}
	return out
}

// BenchmarkCachedPodSize states the heap a cached pod holds in every
// agent, as the API server sends it and slimmed:
//
//	go test -run '^$' -bench CachedPodSize -benchtime 1x ./node/clusterview/
func BenchmarkCachedPodSize(b *testing.B) {
	const n = 2000
	for range b.N {
		full := retained(n, func(int) any { return decodePods(b, 1)[0] })
		slimmed := retained(n, func(int) any { return slimPod(decodePods(b, 1)[0]) })
		b.ReportMetric(full, "full-B/pod")
		b.ReportMetric(slimmed, "slim-B/pod")
	}
}

// TestSlimPodIsSmaller: a slim pod holds under a quarter of the heap of
// the full one (measured: see BenchmarkCachedPodSize).
func TestSlimPodIsSmaller(t *testing.T) {
	const n = 500
	full := retained(n, func(int) any { return decodePods(t, 1)[0] })
	slimmed := retained(n, func(int) any { return slimPod(decodePods(t, 1)[0]) })
	t.Logf("cached pod: %.0f B full, %.0f B slim", full, slimmed)
	if slimmed*4 > full {
		t.Errorf("slim pod holds %.0f B, full %.0f B: want under a quarter", slimmed, full)
	}
}
