package inbound

import (
	"log/slog"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/netpol"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

// engineAuthorizer is the agent's Authorizer reduced to its core: the real
// authz.Engine over plain maps.
type engineAuthorizer struct {
	e       *authz.Engine
	byAddr  map[netip.Addr]*corev1.Pod
	synced  bool
	denials int
}

func (a *engineAuthorizer) AuthorizeInbound(r Request, src *corev1.Pod, dst *pods.Pod) (bool, bool, string) {
	if !a.synced {
		return false, false, "policies not synced"
	}
	id := r.ClientID
	d := a.e.Inbound(authz.Client{IP: r.Header.Src, Pod: src, ID: &id}, a.byAddr[dst.Addrs[0]], r.Header.Dst.Port())
	if !d.Allowed {
		a.denials++
	}
	return d.Allowed, true, d.Detail
}

type mapCluster map[netip.Addr]*corev1.Pod

func (m mapCluster) PodByAddr(a netip.Addr) (*corev1.Pod, error) { return m[a], nil }
func (m mapCluster) Namespace(name string) (*corev1.Namespace, error) {
	if name == "prod" || name == "web" {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/metadata.name": name}}}, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "namespaces"}, name)
}

func TestCheckPolicies(t *testing.T) {
	tcp := corev1.ProtocolTCP
	http := intstr.FromString("http")
	denyAll := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "default-deny"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
	allowRole := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "allow-clients"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &http}},
			}},
		}}
	onlyBatch := &authz.AuthorizationObject{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "batch-only"},
		Spec: authz.AuthorizationSpec{From: []authz.IdentityRef{{ServiceAccount: &authz.ServiceAccountRef{Name: "batch"}}}}}

	serverName := id("prod", "server").DNSName("tunmesh")
	req := func(client spiffe.ID, src netip.Addr, port uint16) Request {
		return Request{ClientID: client, ServerName: serverName, Peer: nodeA, Header: tunnel.Header{Src: src, Dst: netip.AddrPortFrom(dstIP, port)}}
	}
	withLabels := func(p *corev1.Pod, l map[string]string) *corev1.Pod { p.Labels = l; return p }
	for _, tc := range []struct {
		name     string
		src      *corev1.Pod
		nps      []*networkingv1.NetworkPolicy
		authzs   []*authz.AuthorizationObject
		unsynced bool
		req      Request
		want     tunnel.Reason
	}{
		{name: "no policy: allowed", src: srcPod("client", "default", srcIP.String(), nodeA.String(), false),
			req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonNone},
		{name: "default deny", src: srcPod("client", "default", srcIP.String(), nodeA.String(), false), nps: []*networkingv1.NetworkPolicy{denyAll},
			req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonPolicy},
		{name: "allowed by pod selector on a named port", src: withLabels(srcPod("client", "default", srcIP.String(), nodeA.String(), false), map[string]string{"role": "client"}),
			nps: []*networkingv1.NetworkPolicy{denyAll, allowRole}, req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonNone},
		{name: "named port does not cover another port", src: withLabels(srcPod("client", "default", srcIP.String(), nodeA.String(), false), map[string]string{"role": "client"}),
			nps: []*networkingv1.NetworkPolicy{denyAll, allowRole}, req: req(id("prod", "default"), srcIP, 9090), want: tunnel.ReasonPolicy},
		{name: "source without the label", src: withLabels(srcPod("client", "default", srcIP.String(), nodeA.String(), false), map[string]string{"role": "other"}),
			nps: []*networkingv1.NetworkPolicy{denyAll, allowRole}, req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonPolicy},
		{name: "authorization admits its ServiceAccount", src: srcPod("client", "batch", srcIP.String(), nodeA.String(), false),
			authzs: []*authz.AuthorizationObject{onlyBatch}, req: req(id("prod", "batch"), srcIP, 8080), want: tunnel.ReasonNone},
		{name: "authorization refuses another valid identity", src: srcPod("client", "default", srcIP.String(), nodeA.String(), false),
			authzs: []*authz.AuthorizationObject{onlyBatch}, req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonPolicy},
		{name: "not synced: waits, then refused", src: srcPod("client", "default", srcIP.String(), nodeA.String(), false), unsynced: true,
			req: req(id("prod", "default"), srcIP, 8080), want: tunnel.ReasonPolicy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "server"},
				Spec:   corev1.PodSpec{ServiceAccountName: "server", Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
				Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: dstIP.String()}}
			byAddr := mapCluster{srcIP: tc.src, dstIP: server}
			snap, err := netpol.NewSnapshot(tc.nps, map[string]map[string]string{"prod": {"kubernetes.io/metadata.name": "prod"}})
			if err != nil {
				t.Fatal(err)
			}
			idx, err := authz.NewIndex(tc.authzs)
			if err != nil {
				t.Fatal(err)
			}
			e, err := authz.New(byAddr, snap, idx, policy.Config{}, "cluster.local")
			if err != nil {
				t.Fatal(err)
			}
			az := &engineAuthorizer{e: e, byAddr: byAddr, synced: !tc.unsynced}
			dst := &pods.Pod{Namespace: "prod", Name: "server", Addrs: []netip.Addr{dstIP}, NIC: 3, ID: id("prod", "server")}
			a, err := New(Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh", SourceWait: 100 * time.Millisecond, Authorizer: az},
				fakeLocal{dstIP: dst}, fakeCluster{srcIP: {tc.src}}, noCerts{}, noDial{}, nodemetrics.ForTest(), slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			_, got, detail, waited := a.CheckWait(t.Context(), tc.req)
			if got != tc.want {
				t.Fatalf("CheckWait = %s (%s), want %s", got, detail, tc.want)
			}
			if tc.unsynced != (waited > 0) {
				t.Fatalf("waited %s; a check waits only while the policies are not synced", waited)
			}
			if want := tc.want == tunnel.ReasonPolicy && !tc.unsynced; (az.denials > 0) != want {
				t.Fatalf("denials %d, want some: %v", az.denials, want)
			}
		})
	}
}
