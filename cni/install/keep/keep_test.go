package keep

import (
	"context"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

// TestKeepWhileDaemonSetExists: the exit decision keeps the plugin while
// the pod's DaemonSet exists and removes it when the DaemonSet is gone or
// going, or when it cannot tell.
func TestKeepWhileDaemonSetExists(t *testing.T) {
	const ns = "tunmesh"
	pod := func(owner string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-node-x", Namespace: ns}}
		if owner != "" {
			ctrl := true
			p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: owner, Name: "tunmesh-node", UID: "u1", Controller: &ctrl}}
		}
		return p
	}
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-node", Namespace: ns, UID: "u1"}}
	deleting := ds.DeepCopy()
	now := metav1.Now()
	deleting.DeletionTimestamp = &now
	deleting.Finalizers = []string{"foregroundDeletion"}
	for _, tc := range []struct {
		name string
		objs []runtime.Object
		keep bool
		why  string
	}{
		{"rollout: DaemonSet exists", []runtime.Object{pod("DaemonSet"), ds}, true, "still exists"},
		{"DaemonSet deleted", []runtime.Object{pod("DaemonSet")}, false, "deleted"},
		{"DaemonSet being deleted", []runtime.Object{pod("DaemonSet"), deleting}, false, "being deleted"},
		{"not a DaemonSet pod", []runtime.Object{pod(""), ds}, false, "not run by a DaemonSet"},
		{"own pod unreadable", []runtime.Object{ds}, false, "read own pod"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			keep, why := WhileDaemonSetExists(fake.NewClientset(tc.objs...), ns, "tunmesh-node-x")(context.Background())
			if keep != tc.keep || !strings.Contains(why, tc.why) {
				t.Errorf("keep %v (%s), want %v (%s)", keep, why, tc.keep, tc.why)
			}
		})
	}
}
