package release

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestParseMode(t *testing.T) {
	for _, s := range []string{"never", "daemonset-deleted"} {
		if m, err := ParseMode(s); err != nil || string(m) != s {
			t.Errorf("ParseMode(%q) = %q, %v", s, m, err)
		}
	}
	for _, s := range []string{"", "always", "Never"} {
		if _, err := ParseMode(s); !errors.Is(err, ErrBadMode) {
			t.Errorf("ParseMode(%q) err = %v, want ErrBadMode", s, err)
		}
	}
}

// TestDecide: the pods are released only on a deletion the API reported;
// a live answer wins over the watch; anything unknown keeps them.
func TestDecide(t *testing.T) {
	o := func(s State) Observation { return Observation{s, s.String()} }
	for _, tc := range []struct {
		live, watched State
		release       bool
	}{
		{Exists, Unknown, false},
		{Exists, Deleted, false}, // re-created since: its agent takes over
		{Deleted, Unknown, true},
		{Deleting, Exists, true},
		{Unknown, Deleted, true}, // token refused at exit, the watch saw it
		{Unknown, Deleting, true},
		{Unknown, Exists, false},
		{Unknown, Unknown, false}, // cannot tell: fail closed
	} {
		if got, why := Decide(o(tc.live), o(tc.watched)); got != tc.release {
			t.Errorf("Decide(live %s, watch %s) = %v (%s), want %v", tc.live, tc.watched, got, why, tc.release)
		}
	}
}

const ns = "tunmesh"

func agentPod(owner string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-node-x", Namespace: ns}}
	if owner != "" {
		ctrl := true
		p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: owner, Name: "tunmesh-node", UID: "u1", Controller: &ctrl}}
	}
	return p
}

// TestWatcherDecide runs the watcher against a fake API through the
// situations of an agent's exit.
func TestWatcherDecide(t *testing.T) {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-node", Namespace: ns, UID: "u1"}}
	deleting := ds.DeepCopy()
	now := metav1.Now()
	deleting.DeletionTimestamp = &now
	deleting.Finalizers = []string{"foregroundDeletion"}
	unauthorized := func(c *fake.Clientset) {
		c.PrependReactor("get", "*", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewUnauthorized("service account has been deleted")
		})
	}
	for _, tc := range []struct {
		name string
		objs []runtime.Object
		// atExit runs after the watch has synced, before Decide.
		atExit  func(t *testing.T, c *fake.Clientset)
		release bool
		why     string
	}{
		{name: "rollout: DaemonSet exists", objs: []runtime.Object{agentPod("DaemonSet"), ds}, release: false, why: "exists"},
		{name: "uninstall: DaemonSet deleted", objs: []runtime.Object{agentPod("DaemonSet"), ds},
			atExit: func(t *testing.T, c *fake.Clientset) {
				if err := c.AppsV1().DaemonSets(ns).Delete(context.Background(), ds.Name, metav1.DeleteOptions{}); err != nil {
					t.Fatal(err)
				}
			}, release: true, why: "deleted"},
		{name: "uninstall: DaemonSet being deleted", objs: []runtime.Object{agentPod("DaemonSet"), deleting}, release: true, why: "being deleted"},
		{name: "uninstall, token refused at exit: the watch saw the deletion", objs: []runtime.Object{agentPod("DaemonSet"), ds},
			atExit: func(t *testing.T, c *fake.Clientset) {
				if err := c.AppsV1().DaemonSets(ns).Delete(context.Background(), ds.Name, metav1.DeleteOptions{}); err != nil {
					t.Fatal(err)
				}
				unauthorized(c)
			}, release: true, why: "watch: DaemonSet tunmesh/tunmesh-node deleted"},
		{name: "API refuses at exit, no deletion seen: keep", objs: []runtime.Object{agentPod("DaemonSet"), ds},
			atExit: func(t *testing.T, c *fake.Clientset) { unauthorized(c) }, release: false, why: "cannot tell"},
		{name: "not run by a DaemonSet: keep", objs: []runtime.Object{agentPod(""), ds}, release: false, why: "not run by a DaemonSet"},
		{name: "own pod unreadable: keep", objs: []runtime.Object{ds}, release: false, why: "read own pod"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := fake.NewClientset(tc.objs...)
			w, err := NewWatcher(c, ns, "tunmesh-node-x", slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			w.Settle = 300 * time.Millisecond
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- w.Run(ctx) }()
			defer func() { cancel(); <-done }()
			// Wait for the watch to report (or to give up finding the owner).
			deadline := time.Now().Add(5 * time.Second)
			for {
				_, o, _ := w.snapshot()
				if o.State != Unknown || o.Why != "not watched yet" || time.Now().After(deadline) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if tc.atExit != nil {
				tc.atExit(t, c)
			}
			release, why := w.Decide(context.Background())
			if release != tc.release || !strings.Contains(why, tc.why) {
				t.Fatalf("Decide = %v (%s), want %v (%s)", release, why, tc.release, tc.why)
			}
		})
	}
}
