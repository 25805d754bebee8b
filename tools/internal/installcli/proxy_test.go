package installcli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/admin"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

// pki is a dev trust anchor, an issuer, and leaves signed by it.
type pki struct {
	anchors *x509.CertPool
	ca      *ca.CA
}

func newPKI(t *testing.T, now time.Time) pki {
	t.Helper()
	root, rootKey, err := ca.NewRoot("root", 48*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	inter, interKey, err := ca.NewIntermediate(root, rootKey, "issuer", 24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	anchors, err := ca.ParseAnchors(ca.EncodeCertPEM(root))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.New(ca.Config{}, &ca.Issuer{Certificate: inter, Key: interKey}, anchors)
	if err != nil {
		t.Fatal(err)
	}
	return pki{anchors: anchors.Pool(), ca: c}
}

func (p pki) leaf(t *testing.T, id string, now time.Time) string {
	t.Helper()
	sid, err := spiffe.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{sid.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := p.ca.Sign(csr, sid, now)
	if err != nil {
		t.Fatal(err)
	}
	var certs []*x509.Certificate
	for _, der := range chain {
		c, _ := x509.ParseCertificate(der)
		certs = append(certs, c)
	}
	return string(ca.EncodeCertPEM(certs...))
}

// workloadPod is a running pod of the pod network.
func workloadPod(ns, name, sa, node string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annotations},
		Spec:   corev1.PodSpec{NodeName: node, ServiceAccountName: sa},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.0.9"}}
}

func TestCheckProxy(t *testing.T) {
	now := time.Now()
	p := newPKI(t, now)
	other := newPKI(t, now)
	old := newPKI(t, now.Add(-26*time.Hour))
	const web = "spiffe://cluster.local/ns/shop/sa/web"
	node := func(n string) *corev1.Node { return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}} }
	agent := func(n string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "tunmesh", Name: "tunmesh-node-" + n, Labels: map[string]string{"app": "tunmesh-node"}},
			Spec: corev1.PodSpec{NodeName: n}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	}
	okStatus := admin.Status{Version: "v1", Ready: true, CNI: admin.CNIReport{Chained: true}}
	cases := []struct {
		name   string
		status map[string]admin.Status
		certs  map[string][]observeapi.PodCert
		fail   []string // names of the failing checks
		hint   string
		// pods run besides those the agents list (which run as the
		// identity listed, on the node that lists them).
		pods []*corev1.Pod
	}{
		{"all good", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "web-1", Identity: web, Chain: p.leaf(t, web, now)}}}, nil, "", nil},
		{"agent not ready", map[string]admin.Status{"n1": okStatus, "n2": {Version: "v1", CNI: admin.CNIReport{Chained: true}, Checks: []admin.CheckResult{{Name: "informers", Error: "not synced"}}}},
			nil, []string{CheckProxyAgents}, "informers: not synced", nil},
		{"conflist not chained", map[string]admin.Status{"n1": okStatus, "n2": {Version: "v1", Ready: true, CNI: admin.CNIReport{ConfDir: "/etc/cni/net.d", File: "10-bridge.conflist", Plugins: []string{"bridge"}}}},
			nil, []string{CheckCNIChained}, "[bridge]", nil},
		{"versions differ", map[string]admin.Status{"n1": okStatus, "n2": {Version: "v2", Ready: true, CNI: admin.CNIReport{Chained: true}}},
			nil, []string{CheckProxyVer}, "different versions", nil},
		{"certificate from another CA", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n2": {{Namespace: "shop", Name: "web-2", Identity: web, Chain: other.leaf(t, web, now)}}}, []string{CheckProxyCerts}, "does not chain", nil},
		{"expired certificate", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "web-1", Identity: web, Chain: old.leaf(t, web, now.Add(-25*time.Hour))}}}, []string{CheckProxyCerts}, "not current", nil},
		{"certificate of another identity", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "db-1", Identity: "spiffe://cluster.local/ns/shop/sa/db", Chain: p.leaf(t, web, now)}}}, []string{CheckProxyCerts}, "names " + web, nil},
		{"no certificate", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "web-1", Identity: web, Error: "identity service unreachable"}}}, []string{CheckProxyCerts}, "unreachable", nil},
		{"agent claims another identity for a pod", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "db-1", Identity: web, Chain: p.leaf(t, web, now)}}}, []string{CheckProxyCerts}, "runs as spiffe://cluster.local/ns/shop/sa/db",
			[]*corev1.Pod{workloadPod("shop", "db-1", "db", "n1", nil)}},
		{"agent lists a pod of another node", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			map[string][]observeapi.PodCert{"n1": {{Namespace: "shop", Name: "web-2", Identity: web, Chain: p.leaf(t, web, now)}}}, []string{CheckProxyCerts}, "does not list as running there",
			[]*corev1.Pod{workloadPod("shop", "web-2", "web", "n2", nil)}},
		{"meshed pod missing from its agent", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			nil, []string{CheckProxyCerts}, "shop/web-3 on n2: meshed by policy but not served",
			[]*corev1.Pod{workloadPod("shop", "web-3", "web", "n2", nil)}},
		{"unmeshed pods need not be listed", map[string]admin.Status{"n1": okStatus, "n2": okStatus},
			nil, nil, "",
			[]*corev1.Pod{workloadPod("shop", "legacy", "web", "n1", map[string]string{"tunmesh.io/inject": "disabled"}), workloadPod("kube-system", "coredns-1", "coredns", "n2", nil)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			client := fake.NewClientset(node("n1"), node("n2"), agent("n1"), agent("n2"))
			for n, pcs := range c.certs {
				for _, pc := range pcs {
					id, err := spiffe.Parse(pc.Identity)
					if err != nil {
						t.Fatal(err)
					}
					if slices.ContainsFunc(c.pods, func(p *corev1.Pod) bool { return p.Name == pc.Name }) {
						continue
					}
					c.pods = append(c.pods, workloadPod(pc.Namespace, pc.Name, id.ServiceAccount, n, nil))
				}
			}
			for _, p := range c.pods {
				if _, err := client.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			status := func(_ context.Context, pod *corev1.Pod) (admin.Status, error) {
				st, ok := c.status[pod.Spec.NodeName]
				if !ok {
					return admin.Status{}, errors.New("unreachable")
				}
				return st, nil
			}
			certs := func(_ context.Context, n string) ([]observeapi.PodCert, error) { return c.certs[n], nil }
			checks, err := CheckProxy(context.Background(), client, "tunmesh", "app=tunmesh-node", p.anchors, now, status, certs)
			if err != nil {
				t.Fatal(err)
			}
			var failed []string
			var hints string
			for _, ch := range checks {
				if !ch.OK {
					failed = append(failed, ch.Name)
					hints += ch.Hint
				}
			}
			if len(failed) != len(c.fail) {
				t.Fatalf("failed %v, want %v (hints %q)", failed, c.fail, hints)
			}
			for i := range failed {
				if !strings.HasPrefix(failed[i], c.fail[i]) {
					t.Fatalf("failed %v, want %v", failed, c.fail)
				}
			}
			if !strings.Contains(hints, c.hint) {
				t.Fatalf("hints %q lack %q", hints, c.hint)
			}
		})
	}
}
