package authz

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/netpol"
	"github.com/tunmesh/tunmesh/node/policy"
)

// fakeCluster is a Cluster over plain maps.
type fakeCluster struct {
	pods  map[netip.Addr]*corev1.Pod
	ns    map[string]*corev1.Namespace
	nsErr error
}

func (f *fakeCluster) PodByAddr(a netip.Addr) (*corev1.Pod, error) { return f.pods[a], nil }
func (f *fakeCluster) Namespace(name string) (*corev1.Namespace, error) {
	if f.nsErr != nil {
		return nil, f.nsErr
	}
	if ns, ok := f.ns[name]; ok {
		return ns, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "namespaces"}, name)
}

func testPod(ns, name, ip, sa string, lbl map[string]string, ann map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbl, Annotations: ann},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Ports: ports}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip},
	}
}

func nsObj(name string, lbl, ann map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: lbl, Annotations: ann}}
}

func id(ns, sa string) *spiffe.ID {
	return &spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
}

var (
	tcp        = corev1.ProtocolTCP
	ingressAll = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	egressOnly = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
)

func np(ns, name string, sel map[string]string, types []networkingv1.PolicyType, in []networkingv1.NetworkPolicyIngressRule, eg []networkingv1.NetworkPolicyEgressRule) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: sel}, PolicyTypes: types, Ingress: in, Egress: eg},
	}
}

func az(ns, name string, sel map[string]string, ports []AuthorizationPort, from ...IdentityRef) *AuthorizationObject {
	return &AuthorizationObject{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: AuthorizationSpec{PodSelector: metav1.LabelSelector{MatchLabels: sel}, Ports: ports, From: from}}
}

type world struct {
	pods      []*corev1.Pod
	ns        []*corev1.Namespace
	netpols   []*networkingv1.NetworkPolicy
	authzs    []*AuthorizationObject
	nsErr     error
	wantBuild bool // the world has invalid objects: building reports them
}

func (w world) engine(t testing.TB) *Engine {
	t.Helper()
	c := &fakeCluster{pods: map[netip.Addr]*corev1.Pod{}, ns: map[string]*corev1.Namespace{}, nsErr: w.nsErr}
	nsLabels := map[string]map[string]string{}
	for _, p := range w.pods {
		c.pods[netip.MustParseAddr(p.Status.PodIP)] = p
	}
	for _, n := range w.ns {
		c.ns[n.Name] = n
		nsLabels[n.Name] = n.Labels
	}
	snap, err := netpol.NewSnapshot(w.netpols, nsLabels)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := NewIndex(w.authzs)
	if (err != nil) != w.wantBuild || (err != nil && !errors.Is(err, ErrInvalidAuthorization)) {
		t.Fatalf("NewIndex error %v, want one: %v", err, w.wantBuild)
	}
	e, err := New(c, snap, idx, policy.Config{}, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestEngine(t *testing.T) {
	httpPort := corev1.ContainerPort{Name: "http", ContainerPort: 8080, Protocol: tcp}
	server := testPod("prod", "api", "10.244.1.10", "api", map[string]string{"app": "api"}, nil, httpPort)
	frontend := testPod("web", "frontend", "10.244.2.10", "frontend", map[string]string{"app": "frontend"}, nil)
	other := testPod("web", "other", "10.244.2.11", "other", map[string]string{"app": "other"}, nil)
	namespaces := []*corev1.Namespace{nsObj("prod", map[string]string{"env": "prod"}, nil), nsObj("web", map[string]string{"env": "web"}, nil)}
	withAnn := func(p *corev1.Pod, ann map[string]string) *corev1.Pod {
		c := *p
		c.Annotations = ann
		return &c
	}
	withLabels := func(p *corev1.Pod, l map[string]string) *corev1.Pod {
		c := *p
		c.Labels = l
		return &c
	}
	denyAll := np("prod", "default-deny", nil, ingressAll, nil, nil)
	allowFrontendNamed := np("prod", "allow-frontend", map[string]string{"app": "api"}, ingressAll, []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"env": "web"}},
			PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}},
		}},
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptr(intstr.FromString("http"))}},
	}}, nil)
	egressDeny := np("web", "no-egress", map[string]string{"app": "frontend"}, egressOnly, nil, nil)
	onlyFrontendSA := az("prod", "frontend-only", map[string]string{"app": "api"}, []AuthorizationPort{{Port: intstr.FromString("http")}},
		IdentityRef{ServiceAccount: &ServiceAccountRef{Name: "frontend", Namespace: "web"}})
	badAuthz := az("prod", "typo", map[string]string{"app": "api"}, nil, IdentityRef{Namespace: "web", SPIFFEID: "spiffe://cluster.local/ns/web/sa/x"})

	type check struct {
		client *corev1.Pod // nil: a non-pod address
		meshed bool
		// foreignTD: the client identity is of another trust domain.
		foreignTD bool
		port      uint16
		allowed   bool
		kind      string
		policy    string
		reason    string
	}
	for _, tc := range []struct {
		name   string
		w      world
		checks []check
	}{
		{name: "nothing applies: all-unauthenticated", w: world{pods: []*corev1.Pod{server, frontend}, ns: namespaces}, checks: []check{
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, policy: "prod/all-unauthenticated", reason: ReasonAllowed},
			{client: frontend, port: 8080, allowed: true, kind: KindDefaultInbound, reason: ReasonAllowed},
		}},
		{name: "default deny ingress", w: world{pods: []*corev1.Pod{server, frontend}, ns: namespaces, netpols: []*networkingv1.NetworkPolicy{denyAll}}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindNetworkPolicy, policy: "prod/default-deny", reason: ReasonNetpolDefaultDeny},
			{client: frontend, port: 8080, kind: KindNetworkPolicy, policy: "prod/default-deny", reason: ReasonNetpolDefaultDeny},
		}},
		{name: "allowed by namespace+pod selector on a named port", w: world{pods: []*corev1.Pod{server, frontend, other}, ns: namespaces,
			netpols: []*networkingv1.NetworkPolicy{denyAll, allowFrontendNamed}}, checks: []check{
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, reason: ReasonAllowed},
			{client: frontend, meshed: true, port: 9090, kind: KindNetworkPolicy, policy: "prod/allow-frontend", reason: ReasonNetpolDefaultDeny},
			{client: other, meshed: true, port: 8080, kind: KindNetworkPolicy, reason: ReasonNetpolDefaultDeny},
			{client: nil, port: 8080, kind: KindNetworkPolicy, reason: ReasonNetpolDefaultDeny},
		}},
		{name: "a label change is seen by the next decision", w: world{pods: []*corev1.Pod{server, withLabels(other, map[string]string{"app": "frontend"})}, ns: namespaces,
			netpols: []*networkingv1.NetworkPolicy{denyAll, allowFrontendNamed}}, checks: []check{
			{client: withLabels(other, map[string]string{"app": "frontend"}), meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, reason: ReasonAllowed},
		}},
		{name: "authorization admits one ServiceAccount", w: world{pods: []*corev1.Pod{server, frontend, other}, ns: namespaces,
			authzs: []*AuthorizationObject{onlyFrontendSA}}, checks: []check{
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindAuthorization, policy: "prod/frontend-only", reason: ReasonAllowed},
			{client: other, meshed: true, port: 8080, kind: KindAuthorization, policy: "prod/frontend-only", reason: ReasonNotAuthorized},
			{client: frontend, meshed: true, port: 9090, kind: KindAuthorization, reason: ReasonNotAuthorized},
			{client: frontend, port: 8080, kind: KindAuthorization, reason: ReasonPlaintextRefused},
		}},
		{name: "an invalid authorization restricts and admits nothing", w: world{pods: []*corev1.Pod{server, frontend}, ns: namespaces,
			authzs: []*AuthorizationObject{badAuthz}, wantBuild: true}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindAuthorization, policy: "prod/typo", reason: ReasonNotAuthorized},
		}},
		{name: "all-authenticated on the pod", w: world{pods: []*corev1.Pod{withAnn(server, map[string]string{policy.AnnotationDefaultInboundPolicy: "all-authenticated"}), frontend}, ns: namespaces}, checks: []check{
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, policy: "prod/all-authenticated", reason: ReasonAllowed},
			{client: frontend, port: 8080, kind: KindDefaultInbound, policy: "prod/all-authenticated", reason: ReasonPlaintextRefused},
			{client: nil, port: 8080, kind: KindDefaultInbound, reason: ReasonPlaintextRefused},
		}},
		{name: "cluster-authenticated: this trust domain only", w: world{pods: []*corev1.Pod{withAnn(server, map[string]string{policy.AnnotationDefaultInboundPolicy: "cluster-authenticated"}), frontend}, ns: namespaces}, checks: []check{
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, policy: "prod/cluster-authenticated", reason: ReasonAllowed},
			{client: frontend, meshed: true, foreignTD: true, port: 8080, kind: KindDefaultInbound, reason: ReasonNotAuthorized},
			{client: frontend, port: 8080, kind: KindDefaultInbound, reason: ReasonPlaintextRefused},
		}},
		{name: "deny on the namespace (linkerd key)", w: world{pods: []*corev1.Pod{server, frontend},
			ns: []*corev1.Namespace{nsObj("prod", nil, map[string]string{policy.LinkerdAnnotationDefaultInboundPolicy: "deny"}), namespaces[1]}}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindDefaultInbound, policy: "prod/deny", reason: ReasonDefaultDeny},
			{client: frontend, port: 8080, kind: KindDefaultInbound, policy: "prod/deny", reason: ReasonDefaultDeny},
		}},
		{name: "bad annotation fails closed", w: world{pods: []*corev1.Pod{withAnn(server, map[string]string{policy.AnnotationDefaultInboundPolicy: "allow-all"}), frontend}, ns: namespaces}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindDefaultInbound, policy: "prod/deny", reason: ReasonDefaultDeny},
		}},
		{name: "namespace lookup failure denies", w: world{pods: []*corev1.Pod{server, frontend}, ns: namespaces, nsErr: errors.New("not synced")}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindLookup, reason: ReasonLookupFailed},
		}},
		// Review finding 6: the pod seen before its namespace (which says
		// deny) was judged on its own annotations only: open.
		{name: "namespace missing from the view: a lookup failure, not a default", w: world{pods: []*corev1.Pod{server, frontend}, ns: namespaces[1:]}, checks: []check{
			{client: frontend, meshed: true, port: 8080, kind: KindLookup, reason: ReasonLookupFailed},
			{client: frontend, port: 8080, kind: KindLookup, reason: ReasonLookupFailed},
		}},
		// Review finding 7: a pod still served after its inject annotation
		// changed to disabled kept no default inbound policy: open.
		{name: "inject disabled on a served pod: its default inbound policy still applies", w: world{pods: []*corev1.Pod{withAnn(server, map[string]string{
			policy.AnnotationInject: "disabled", policy.AnnotationDefaultInboundPolicy: "all-authenticated"}), frontend}, ns: namespaces}, checks: []check{
			{client: frontend, port: 8080, kind: KindDefaultInbound, policy: "prod/all-authenticated", reason: ReasonPlaintextRefused},
			{client: frontend, meshed: true, port: 8080, allowed: true, kind: KindDefaultInbound, policy: "prod/all-authenticated", reason: ReasonAllowed},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.w.engine(t)
			dst := tc.w.pods[0]
			for _, c := range tc.checks {
				cl := Client{IP: netip.MustParseAddr("192.168.9.9")}
				if c.client != nil {
					cl.IP, cl.Pod = netip.MustParseAddr(c.client.Status.PodIP), c.client
				}
				if c.meshed {
					cl.ID = id(c.client.Namespace, c.client.Spec.ServiceAccountName)
					if c.foreignTD {
						cl.ID.TrustDomain = "other.org"
					}
				}
				d := e.Inbound(cl, dst, c.port)
				if d.Allowed != c.allowed || d.Kind != c.kind || d.Reason != c.reason || (c.policy != "" && d.Policy != c.policy) {
					t.Errorf("client %v meshed %v port %d: got allowed=%v kind=%s policy=%q reason=%s (%s), want %v %s %q %s",
						podName(c.client), c.meshed, c.port, d.Allowed, d.Kind, d.Policy, d.Reason, d.Detail, c.allowed, c.kind, c.policy, c.reason)
				}
				if len(d.Steps) == 0 || d.Detail == "" {
					t.Errorf("decision without steps or detail: %+v", d)
				}
			}
		})
	}

	t.Run("outbound: egress of the source, then the destination's inbound", func(t *testing.T) {
		w := world{pods: []*corev1.Pod{server, frontend, other}, ns: namespaces, netpols: []*networkingv1.NetworkPolicy{egressDeny}, authzs: []*AuthorizationObject{onlyFrontendSA}}
		e := w.engine(t)
		dst := netip.MustParseAddrPort("10.244.1.10:8080")
		d := e.Outbound(frontend, podIP(frontend), *id("web", "frontend"), dst, server)
		if d.Allowed || d.Direction != "egress" || d.Policy != "web/no-egress" {
			t.Fatalf("egress-denied source: %+v", d)
		}
		d = e.Outbound(other, podIP(other), *id("web", "other"), dst, server)
		if d.Allowed || d.Direction != "ingress" || d.Reason != ReasonNotAuthorized || len(d.Steps) != 3 {
			t.Fatalf("unauthorized source: %+v", d)
		}
	})
	t.Run("plaintext looks the peer up by address", func(t *testing.T) {
		w := world{pods: []*corev1.Pod{server, frontend, other}, ns: namespaces, netpols: []*networkingv1.NetworkPolicy{denyAll, allowFrontendNamed}}
		e := w.engine(t)
		if d := e.Plaintext(server, 8080, netip.MustParseAddr("10.244.2.10")); !d.Allowed {
			t.Fatalf("frontend by address: %+v", d)
		}
		if d := e.Plaintext(server, 8080, netip.MustParseAddr("10.244.2.11")); d.Allowed || !strings.Contains(d.Detail, "default deny") {
			t.Fatalf("other by address: %+v", d)
		}
	})
}

func podName(p *corev1.Pod) string {
	if p == nil {
		return "<not a pod>"
	}
	return p.Namespace + "/" + p.Name
}

func ptr[T any](v T) *T { return &v }

// TestOutboundSourceAddress (review finding 11): the destination's
// ipBlock rules see the flow's verified source address, of the flow's
// family, not the pod's first Status.PodIP.
func TestOutboundSourceAddress(t *testing.T) {
	server := testPod("prod", "api", "10.244.1.10", "api", map[string]string{"app": "api"}, nil)
	client := testPod("web", "frontend", "10.244.2.10", "frontend", nil, nil)
	client.Status.PodIPs = []corev1.PodIP{{IP: "10.244.2.10"}, {IP: "fd00:10:244:2::10"}}
	onlyV6 := np("prod", "from-v6-block", nil, ingressAll, []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "fd00:10:244:2::/64"}}},
	}}, nil)
	w := world{pods: []*corev1.Pod{server, client}, ns: []*corev1.Namespace{nsObj("prod", nil, nil), nsObj("web", nil, nil)},
		netpols: []*networkingv1.NetworkPolicy{onlyV6}}
	e := w.engine(t)
	dst := netip.MustParseAddrPort("[fd00:10:244:1::10]:8080")
	v6 := netip.MustParseAddr("fd00:10:244:2::10")
	if d := e.Outbound(client, v6, *id("web", "frontend"), dst, server); !d.Allowed {
		t.Fatalf("from the v6 address: %+v, want allowed by the v6 ipBlock", d)
	}
	if got := PodAddr(client, dst.Addr()); got != v6 {
		t.Fatalf("PodAddr for a v6 destination = %s, want %s", got, v6)
	}
	if d := e.Outbound(client, podIP(client), *id("web", "frontend"), dst, server); d.Allowed {
		t.Fatalf("from the v4 PodIP: %+v, want denied (the case the source address decides)", d)
	}
}

// TestProbePort: the ports of network probes, named ones resolved in
// their container; exec probes and other ports are not probe ports.
func TestProbePort(t *testing.T) {
	p := &corev1.Pod{Spec: corev1.PodSpec{
		InitContainers: []corev1.Container{{Name: "sidecar", StartupProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 9000}}}}},
		Containers: []corev1.Container{
			{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "health", ContainerPort: 8081}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("health")}}},
				LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}},
			{Name: "db", LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(5432)}}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("http")}}}}, // not its own port name: matches nothing
		},
	}}
	for port, want := range map[uint16]bool{8081: true, 5432: true, 9000: true, 8080: false, 22: false} {
		if got := ProbePort(p, port); got != want {
			t.Errorf("ProbePort(%d) = %v, want %v", port, got, want)
		}
	}
}
