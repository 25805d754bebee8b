package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/node/authz"
)

func authzPod(ns, name, ip, sa string, lbl map[string]string, port int32) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbl},
		Spec:   corev1.PodSpec{ServiceAccountName: sa},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}}
	if port != 0 {
		p.Spec.Containers = []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: port}}}}
	}
	return p
}

func TestRunAuthz(t *testing.T) {
	ns := func(n string) *corev1.Namespace {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{"kubernetes.io/metadata.name": n}}}
	}
	allowWeb := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "allow-web"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "web"}},
			}}}},
		}}
	client := fake.NewClientset(ns("prod"), ns("web"), ns("dev"),
		authzPod("prod", "api", "10.244.1.10", "api", map[string]string{"app": "api"}, 8080),
		authzPod("web", "frontend", "10.244.2.10", "frontend", nil, 0),
		authzPod("web", "crawler", "10.244.2.11", "crawler", nil, 0),
		authzPod("dev", "tool", "10.244.3.10", "tool", nil, 0),
		allowWeb)
	az := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "policy.tunmesh.io/v1alpha1", "kind": "Authorization",
		"metadata": map[string]any{"namespace": "prod", "name": "frontend-only"},
		"spec": map[string]any{"podSelector": map[string]any{}, "from": []any{
			map[string]any{"serviceAccount": map[string]any{"name": "frontend", "namespace": "web"}}}},
	}}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{authz.GroupVersionResource: "AuthorizationList"}, az)

	run := func(from string) string {
		t.Helper()
		var out bytes.Buffer
		err := runAuthz(context.Background(), client, dyn, authzOptions{namespace: "prod", pod: "api", from: from, trustDomain: "cluster.local", controlNS: "tunmesh"}, &out)
		if err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	for _, tc := range []struct {
		from string
		want []string
	}{
		{"", []string{"identity spiffe://cluster.local/ns/prod/sa/api", "isolated by prod/allow-web",
			"prod/allow-web rule 0: from [namespaces {kubernetes.io/metadata.name=web}], any port",
			"authorizations: prod/frontend-only select it", "serviceAccount web/frontend"}},
		{"web/frontend", []string{"(meshed, identity spiffe://cluster.local/ns/web/sa/frontend) to port 8080",
			"ingress allowed by policy prod/allow-web rule 0", "ALLOWED (ingress authorization, prod/frontend-only allowed)"}},
		{"web/crawler", []string{"DENIED (ingress authorization, prod/frontend-only not_authorized)"}},
		{"dev/tool", []string{"DENIED (ingress networkpolicy, prod/allow-web networkpolicy_default_deny)"}},
	} {
		got := run(tc.from)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("--from %q: output lacks %q:\n%s", tc.from, w, got)
			}
		}
	}
}

// TestRunAuthzAsTheAgents (review finding 12): an unusable Authorization
// restricts the pods its podSelector selects, as on the agents (not every
// pod of its namespace), and the default port is looked for in init
// containers (sidecars) too.
func TestRunAuthzAsTheAgents(t *testing.T) {
	sidecar := authzPod("prod", "proxy", "10.244.1.12", "proxy", map[string]string{"app": "proxy"}, 0)
	sidecar.Spec.InitContainers = []corev1.Container{{Name: "side", Ports: []corev1.ContainerPort{{Name: "admin", ContainerPort: 9901}}}}
	client := fake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "prod"}},
		authzPod("prod", "api", "10.244.1.10", "api", map[string]string{"app": "api"}, 8080),
		authzPod("prod", "other", "10.244.1.11", "other", map[string]string{"app": "other"}, 8080),
		sidecar)
	bad := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "policy.tunmesh.io/v1alpha1", "kind": "Authorization",
		"metadata": map[string]any{"namespace": "prod", "name": "bad"},
		"spec":     map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"app": "other"}}, "from": "everyone"},
	}}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{authz.GroupVersionResource: "AuthorizationList"}, bad)
	run := func(pod, from string) string {
		t.Helper()
		var out bytes.Buffer
		if err := runAuthz(context.Background(), client, dyn, authzOptions{namespace: "prod", pod: pod, from: from, trustDomain: "cluster.local", controlNS: "tunmesh"}, &out); err != nil {
			t.Fatalf("%s: %v", pod, err)
		}
		return out.String()
	}
	if got := run("api", ""); strings.Contains(got, "prod/bad select") {
		t.Errorf("the unusable authorization selects app=other only, shown as selecting api:\n%s", got)
	}
	if got := run("other", ""); !strings.Contains(got, "prod/bad select") {
		t.Errorf("the unusable authorization must still restrict app=other:\n%s", got)
	}
	if got := run("proxy", "prod/api"); !strings.Contains(got, "to port 9901") {
		t.Errorf("default port from the init container: output lacks %q:\n%s", "to port 9901", got)
	}
}
