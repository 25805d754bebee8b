package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/node/wireguard"
	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/installcli"
)

// TestNodeGuard runs deploy/node-guard.yaml on the real API server. The
// agent's credential, a tunmesh-node token bound to a pod on node-1 (as
// the kubelet gets for a DaemonSet pod), names node-1 in its user extra;
// with it the agent may set and remove node-1's tunmesh annotations, and
// nothing else: not another node's, not a label, another annotation, a
// taint or the status of its own node. A tunmesh-node request that names
// no node is refused (fail closed).
func TestNodeGuard(t *testing.T) {
	c := need(t)
	ctx := context.Background()
	for _, f := range []string{"namespace.yaml", "node-rbac.yaml", "node-guard.yaml"} {
		c.Kubectl(t, "apply", "-f", filepath.Join("..", "..", "deploy", f))
	}
	t.Cleanup(func() {
		_, _ = c.KubectlErr("delete", "--ignore-not-found", "-f", filepath.Join("..", "..", "deploy", "node-guard.yaml"))
	})
	// tunmeshctl check's verdict on the objects as a real API server
	// stores them (defaulted): in force, no false alarm.
	if chk := installcli.NodeGuard(ctx, c.Client); !chk.OK {
		t.Fatalf("tunmeshctl check on the applied node guard: %s", chk.Hint)
	}
	// nodes/status is not in the agents' RBAC; grant it here so that the
	// policy's own refusal of subresource writes is what is tested.
	statusRole := "e2e-nodeguard-status-" + randomSuffix()
	if _, err := c.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: statusRole},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"patch"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Client.RbacV1().ClusterRoles().Delete(context.Background(), statusRole, metav1.DeleteOptions{})
	})
	if _, err := c.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: statusRole},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: statusRole},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: deploy.Namespace, Name: "tunmesh-node"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Client.RbacV1().ClusterRoleBindings().Delete(context.Background(), statusRole, metav1.DeleteOptions{})
	})

	pod, err := runPod(ctx, c, deploy.Namespace, "e2e-nodeguard-"+randomSuffix(), "tunmesh-node", "node-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Client.CoreV1().Pods(deploy.Namespace).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))})
	})
	agent := tokenClient(t, c, pod.Name, pod.UID)

	// The API server puts the pod's node in the token's user extra.
	rev, err := agent.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := rev.Status.UserInfo.Extra[devcluster.NodeNameExtra]; len(got) != 1 || got[0] != "node-1" {
		t.Fatalf("token bound to a pod on node-1: extra %s = %v (user %+v)", devcluster.NodeNameExtra, got, rev.Status.UserInfo)
	}

	// Not the agent's: an annotation an admin set, which it may not remove.
	foreign := "e2e.tunmesh.io/nodeguard-" + randomSuffix()
	if _, err := c.Client.CoreV1().Nodes().Patch(ctx, "node-1", types.MergePatchType, annotationPatch(foreign, "set-by-admin"), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	ours := []string{wireguard.AnnotationPublicKey, wireguard.AnnotationEndpoint, wireguard.AnnotationOverlay,
		wireguard.AnnotationEncryptAll, observeapi.FingerprintAnnotation}
	t.Cleanup(func() {
		for _, k := range append(ours, foreign) {
			_, _ = c.Client.CoreV1().Nodes().Patch(context.Background(), "node-1", types.MergePatchType, []byte(`{"metadata":{"annotations":{"`+k+`":null}}}`), metav1.PatchOptions{})
		}
	})

	patch := func(cl kubernetes.Interface, node string, p []byte, sub ...string) error {
		_, err := cl.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, p, metav1.PatchOptions{}, sub...)
		return err
	}
	// The policy takes effect once the API server has loaded it.
	waitFor(t, 30*time.Second, "node-guard to refuse a write to node-2", func() error {
		return refusedByGuard(patch(agent, "node-2", annotationPatch(wireguard.AnnotationPublicKey, "stolen")), "may not write node node-2")
	})

	for _, k := range ours {
		if err := patch(agent, "node-1", annotationPatch(k, "e2e-"+randomSuffix())); err != nil {
			t.Errorf("agent of node-1 setting %s on node-1: %v", k, err)
		}
	}
	if err := patch(agent, "node-1", []byte(`{"metadata":{"annotations":{"`+wireguard.AnnotationEndpoint+`":null}}}`)); err != nil {
		t.Errorf("agent of node-1 removing %s from node-1: %v", wireguard.AnnotationEndpoint, err)
	}

	noNode, err := c.Impersonating("system:serviceaccount:" + deploy.Namespace + ":tunmesh-node")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		client kubernetes.Interface
		node   string
		patch  string
		sub    []string
		want   string // in the refusal
	}{
		{"another node's observability pin", agent, "node-2", `{"metadata":{"annotations":{"` + observeapi.FingerprintAnnotation + `":"00"}}}`, nil, "may not write node node-2"},
		{"a label", agent, "node-1", `{"metadata":{"labels":{"e2e-nodeguard":"x"}}}`, nil, "labels"},
		{"another annotation", agent, "node-1", `{"metadata":{"annotations":{"e2e.tunmesh.io/other":"x"}}}`, nil, "e2e.tunmesh.io/other"},
		{"another tunmesh annotation", agent, "node-1", `{"metadata":{"annotations":{"tunmesh.io/inject":"disabled"}}}`, nil, "tunmesh.io/inject"},
		{"removing the admin's annotation", agent, "node-1", `{"metadata":{"annotations":{"` + foreign + `":null}}}`, nil, foreign},
		{"a tunmesh and another annotation", agent, "node-1", `{"metadata":{"annotations":{"` + wireguard.AnnotationPublicKey + `":"k","e2e.tunmesh.io/other":"x"}}}`, nil, "e2e.tunmesh.io/other"},
		{"a taint", agent, "node-1", `{"spec":{"taints":[{"key":"e2e-nodeguard","effect":"NoSchedule"}]}}`, nil, "spec"},
		{"cordon", agent, "node-1", `{"spec":{"unschedulable":true}}`, nil, "spec"},
		{"a finalizer", agent, "node-1", `{"metadata":{"finalizers":["e2e.tunmesh.io/nodeguard"]}}`, nil, "finalizers"},
		{"the status", agent, "node-1", `{"status":{"conditions":[{"type":"E2ENodeGuard","status":"True"}]}}`, []string{"status"}, "nodes/status"},
		{"no node in the credential", noNode, "node-1", `{"metadata":{"annotations":{"` + wireguard.AnnotationPublicKey + `":"k"}}}`, nil, "names no node"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := refusedByGuard(patch(tc.client, tc.node, []byte(tc.patch), tc.sub...), tc.want); err != nil {
				t.Error(err)
			}
		})
	}
	n, err := c.Client.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := n.Labels["e2e-nodeguard"]; ok || len(n.Spec.Taints) > 0 || n.Spec.Unschedulable || n.Annotations[foreign] != "set-by-admin" {
		t.Errorf("a refused write landed on node-1: labels %v, taints %v, unschedulable %v, annotations %v", n.Labels, n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	}
}

// tokenClient returns a client that presents a tunmesh-node token for the
// API server's audience, bound to pod.
func tokenClient(t *testing.T, c *cluster, pod string, uid types.UID) kubernetes.Interface {
	t.Helper()
	tr, err := c.Client.CoreV1().ServiceAccounts(deploy.Namespace).CreateToken(context.Background(), "tunmesh-node", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: new(int64(600)),
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod, UID: uid},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token bound to %s: %v", pod, err)
	}
	admin, err := clientcmd.BuildConfigFromFlags("", c.State.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	rc := rest.AnonymousClientConfig(admin)
	rc.BearerToken = tr.Status.Token
	cl, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

func annotationPatch(k, v string) []byte {
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{k: v}}})
	return b
}

// refusedByGuard: err is node-guard's refusal (not RBAC's), mentioning want.
func refusedByGuard(err error, want string) error {
	if err == nil {
		return errors.New("allowed")
	}
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+deploy.NodeGuardName+"'") {
		return fmt.Errorf("refused, but not by %s: %w", deploy.NodeGuardName, err)
	}
	if !strings.Contains(err.Error(), want) {
		return fmt.Errorf("refusal does not mention %q: %w", want, err)
	}
	return nil
}
