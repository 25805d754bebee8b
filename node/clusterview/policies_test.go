package clusterview

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/node/authz"
)

type invalidCounts struct {
	mu      sync.Mutex
	n       map[string]int
	deleted []string // "kind ns/name" of PolicyDeleted calls
}

func (c *invalidCounts) PolicyDeleted(kind, ns, name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deleted = append(c.deleted, kind+" "+ns+"/"+name)
}

func (c *invalidCounts) wasDeleted(s string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Contains(c.deleted, s)
}

func (c *invalidCounts) SetInvalid(kind string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n[kind] = n
}

func (c *invalidCounts) get(kind string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[kind]
}

func authzObj(ns, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "policy.tunmesh.io/v1alpha1", "kind": "Authorization",
		"metadata": map[string]any{"namespace": ns, "name": name}, "spec": spec,
	}}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPolicies: the view syncs, compiles NetworkPolicies and
// Authorizations per namespace, sees changes, and keeps an invalid
// Authorization as one that admits nothing (counted).
func TestPolicies(t *testing.T) {
	deny := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "deny",
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
	client := fake.NewClientset(deny)
	good := authzObj("prod", "good", map[string]any{"podSelector": map[string]any{}, "from": []any{map[string]any{"namespace": "web"}}})
	bad := authzObj("prod", "bad", map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"app": "api"}}, "from": "everyone"})
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{authz.GroupVersionResource: "AuthorizationList"}, good, bad)
	counts := &invalidCounts{n: map[string]int{}}
	p, err := NewPolicies(client, dyn, counts, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitUntil(t, "sync", p.Synced)

	waitUntil(t, "the network policy", func() bool { return len(p.Policies("prod")) == 1 })
	if got := p.Policies("prod")[0].String(); got != "prod/deny" {
		t.Fatalf("policy %s", got)
	}
	waitUntil(t, "both authorizations", func() bool { return len(p.Authorizations("prod")) == 2 })
	as := p.Authorizations("prod")
	if as[0].String() != "prod/bad" || !as[0].Invalid() || !as[0].Selects(map[string]string{"app": "api"}) || as[0].Selects(map[string]string{"app": "web"}) {
		t.Fatalf("the invalid authorization must keep its selector and admit nothing: %v invalid=%v", as[0], as[0].Invalid())
	}
	if as[1].String() != "prod/good" || as[1].Invalid() {
		t.Fatalf("authorization %v invalid=%v", as[1], as[1].Invalid())
	}
	waitUntil(t, "the invalid count", func() bool { return counts.get("authorization") == 1 })

	// Changes: a new policy in another namespace, the first one deleted,
	// the invalid authorization deleted.
	other := deny.DeepCopy()
	other.Namespace, other.ResourceVersion = "dev", ""
	if _, err := client.NetworkingV1().NetworkPolicies("dev").Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := client.NetworkingV1().NetworkPolicies("prod").Delete(ctx, "deny", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := dyn.Resource(authz.GroupVersionResource).Namespace("prod").Delete(ctx, "bad", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the changes", func() bool {
		return len(p.Policies("prod")) == 0 && len(p.Policies("dev")) == 1 && len(p.Authorizations("prod")) == 1 && counts.get("authorization") == 0
	})
	// The deleted objects' metric series are dropped (review finding 13).
	waitUntil(t, "the deletions reported", func() bool {
		return counts.wasDeleted("networkpolicy prod/deny") && counts.wasDeleted("authorization prod/bad") && !counts.wasDeleted("networkpolicy dev/deny")
	})
}

// TestPoliciesSyncedMeansCompiled: Synced waits for the event handlers to
// have compiled what the informers listed, not just for the informers'
// stores (finding 4: synced before the compiled maps caught up admitted
// flows without isolation right after a restart).
func TestPoliciesSyncedMeansCompiled(t *testing.T) {
	deny := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "deny"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
	client := fake.NewClientset(deny)
	az := authzObj("prod", "good", map[string]any{"podSelector": map[string]any{}, "from": []any{map[string]any{"namespace": "web"}}})
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{authz.GroupVersionResource: "AuthorizationList"}, az)
	p, err := NewPolicies(client, dyn, &invalidCounts{n: map[string]int{}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	// The handlers' rebuilds block on the maps' lock: the informers list,
	// the compiled maps cannot catch up.
	p.mu.Lock()
	locked := true
	unlock := func() {
		if locked {
			locked = false
			p.mu.Unlock()
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	t.Cleanup(unlock) // first: the informers' shutdown waits for the handlers
	waitUntil(t, "the informers' stores", func() bool { return p.npInf.HasSynced() && p.azInf.HasSynced() })
	time.Sleep(300 * time.Millisecond) // Run polls every 100ms
	if p.Synced() {
		t.Fatal("synced while the handlers have not compiled the listed policies")
	}
	select {
	case <-p.SyncedC():
		t.Fatal("SyncedC closed before the sync")
	default:
	}
	unlock()
	select {
	case <-p.SyncedC():
	case <-time.After(5 * time.Second):
		t.Fatal("SyncedC not closed at the sync")
	}
	if !p.Synced() {
		t.Fatal("SyncedC closed before Synced")
	}
	if n, a := len(p.Policies("prod")), len(p.Authorizations("prod")); n != 1 || a != 1 {
		t.Fatalf("synced with %d network policies and %d authorizations compiled, want 1 and 1", n, a)
	}
}
