package agent

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/inbound"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

var (
	enfNodeIP   = netip.MustParseAddr("192.168.0.2")
	enfServerIP = netip.MustParseAddr("10.244.1.10")
	enfOpenIP   = netip.MustParseAddr("10.244.1.11")
	enfLostIP   = netip.MustParseAddr("10.244.1.12")
	enfClientIP = netip.MustParseAddr("10.244.1.20")
	enfPlainIP  = netip.MustParseAddr("10.244.2.30")
)

func enfPod(ns, name string, ip netip.Addr, ann map[string]string, ctr corev1.Container) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}, Annotations: ann},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{ctr}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, HostIP: enfNodeIP.String(), PodIP: ip.String(),
			PodIPs: []corev1.PodIP{{IP: ip.String()}}},
	}
}

func localPod(ns, name string, ip netip.Addr) *pods.Pod {
	return &pods.Pod{Namespace: ns, Name: name, Addrs: []netip.Addr{ip}, NIC: 1,
		ID: spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: "default"}}
}

// newTestEnforcer builds the agent's real enforcer over a fake API server:
// the cluster view and the policy view run (the policy view only when
// startPolicies is called).
func newTestEnforcer(t *testing.T) (e *enforcer, startPolicies func()) {
	t.Helper()
	serving := corev1.Container{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "health", ContainerPort: 8081}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("health")}}}}
	objs := []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "prod"}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "open"}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "legacy", Annotations: map[string]string{policy.AnnotationInject: "disabled"}}},
		enfPod("prod", "server", enfServerIP, nil, serving),
		enfPod("prod", "client", enfClientIP, nil, corev1.Container{Name: "app"}),
		enfPod("open", "strict", enfOpenIP, map[string]string{policy.AnnotationDefaultInboundPolicy: "all-authenticated"}, corev1.Container{Name: "app"}),
		enfPod("gone", "orphan", enfLostIP, nil, corev1.Container{Name: "app"}), // its namespace is not in the view
		enfPod("legacy", "plain", enfPlainIP, nil, corev1.Container{Name: "app"}),
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "deny-all"},
			Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}}},
	}
	client := fake.NewClientset(objs...)
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{authz.GroupVersionResource: "AuthorizationList"})
	log := slog.New(slog.DiscardHandler)
	rep, err := authz.NewReporter(prometheus.NewRegistry(), log)
	if err != nil {
		t.Fatal(err)
	}
	view, err := clusterview.New(client)
	if err != nil {
		t.Fatal(err)
	}
	pv, err := clusterview.NewPolicies(client, dyn, rep, log)
	if err != nil {
		t.Fatal(err)
	}
	eng, err := authz.New(view, pv, pv, policy.Config{}, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	run := func(f func(context.Context) error) {
		done := make(chan struct{})
		go func() { defer close(done); _ = f(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	run(view.Run)
	deadline := time.Now().Add(5 * time.Second)
	for !view.Synced() {
		if time.Now().After(deadline) {
			t.Fatal("cluster view not synced")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e = &enforcer{engine: eng, view: view, policies: pv, report: rep, nodeIP: enfNodeIP,
		recorder: record.NewFakeRecorder(100), log: log, warned: map[string]string{}}
	return e, func() {
		run(pv.Run)
		select {
		case <-pv.SyncedC():
		case <-time.After(5 * time.Second):
			t.Fatal("policies not synced")
		}
	}
}

// synAck is the local pod's answer from its port to a plaintext peer.
func synAck(pod netip.Addr, port uint16, peer netip.Addr) netstack.Flow {
	return netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(pod, port), Dst: netip.AddrPortFrom(peer, 40000), SYNACK: true}
}

// TestEnforcer exercises node/agent's real enforcer (the outbound and
// inbound tests use stand-ins): fail closed before the policies' sync and
// on failed lookups, the node's probes on declared probe ports only,
// NetworkPolicy only on skipped ports, egress of passed-through flows.
func TestEnforcer(t *testing.T) {
	e, startPolicies := newTestEnforcer(t)
	server := localPod("prod", "server", enfServerIP)
	client := localPod("prod", "client", enfClientIP)
	strict := localPod("open", "strict", enfOpenIP)

	// Before the policies' sync: nothing is judged, everything is held.
	if _, err := e.Plaintext(synAck(enfServerIP, 8080, enfPlainIP), server, false); !errors.Is(err, clusterview.ErrNotSynced) {
		t.Fatalf("plaintext before sync: err %v, want ErrNotSynced", err)
	}
	if _, err := e.Egress(netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(enfClientIP, 40000)}, client, netip.AddrPortFrom(enfPlainIP, 80)); !errors.Is(err, clusterview.ErrNotSynced) {
		t.Fatalf("egress before sync: err %v, want ErrNotSynced", err)
	}
	if _, err := e.Outbound(netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(enfClientIP, 40000)}, client, netip.AddrPortFrom(enfServerIP, 8080), nil); !errors.Is(err, clusterview.ErrNotSynced) {
		t.Fatalf("outbound before sync: err %v, want ErrNotSynced", err)
	}
	// The kubelet's probe of a declared probe port passes even before.
	if ok, err := e.Plaintext(synAck(enfServerIP, 8081, enfNodeIP), server, false); !ok || err != nil {
		t.Fatalf("node probe before sync: %v %v, want allowed", ok, err)
	}
	startPolicies()

	for _, tc := range []struct {
		name    string
		pod     *pods.Pod
		flow    netstack.Flow
		skipped bool
		allowed bool
		anyErr  bool
	}{
		{name: "default deny refuses a plaintext client", pod: server, flow: synAck(enfServerIP, 8080, enfPlainIP)},
		{name: "the node on a declared probe port (named)", pod: server, flow: synAck(enfServerIP, 8081, enfNodeIP), allowed: true},
		{name: "the node on the serving port: judged like anyone", pod: server, flow: synAck(enfServerIP, 8080, enfNodeIP)},
		{name: "all-authenticated refuses plaintext", pod: strict, flow: synAck(enfOpenIP, 9090, enfPlainIP)},
		{name: "skip-inbound port: NetworkPolicy only", pod: strict, flow: synAck(enfOpenIP, 9090, enfPlainIP), skipped: true, allowed: true},
		{name: "skip-inbound port: NetworkPolicy still denies", pod: server, flow: synAck(enfServerIP, 9090, enfPlainIP), skipped: true},
		{name: "pod not in the view: an error", pod: localPod("prod", "ghost", enfServerIP), flow: synAck(enfServerIP, 8080, enfPlainIP), anyErr: true},
		{name: "namespace not in the view: a lookup error, never a default", pod: localPod("gone", "orphan", enfLostIP), flow: synAck(enfLostIP, 8080, enfPlainIP), anyErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ok, err := e.Plaintext(tc.flow, tc.pod, tc.skipped)
			switch {
			case tc.anyErr && err == nil:
				t.Fatalf("Plaintext = %v, nil; want an error (the flow is held)", ok)
			case !tc.anyErr && err != nil:
				t.Fatalf("Plaintext error %v", err)
			case ok != tc.allowed:
				t.Fatalf("Plaintext = %v, want %v", ok, tc.allowed)
			}
		})
	}

	t.Run("egress of a passed-through flow", func(t *testing.T) {
		f := netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(enfClientIP, 40001)}
		if ok, err := e.Egress(f, client, netip.AddrPortFrom(enfPlainIP, 80)); ok || err != nil {
			t.Fatalf("prod's egress default deny: %v %v, want denied", ok, err)
		}
		if ok, err := e.Egress(f, strict, netip.AddrPortFrom(enfPlainIP, 80)); !ok || err != nil {
			t.Fatalf("no egress policy: %v %v, want allowed", ok, err)
		}
	})
	t.Run("inbound stream", func(t *testing.T) {
		if _, known, detail := e.AuthorizeInbound(inboundReq(enfClientIP, enfServerIP, 8080), nil, localPod("prod", "ghost", enfServerIP)); known {
			t.Fatalf("pod not in the view: known (%s), want unknown", detail)
		}
	})
}

func inboundReq(src, dst netip.Addr, port uint16) inbound.Request {
	return inbound.Request{ClientID: spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "default"},
		Header: tunnel.Header{Src: src, Dst: netip.AddrPortFrom(dst, port)}}
}
