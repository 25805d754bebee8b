package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/service"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/identity/workload"
)

const (
	idNS       = "e2e-identity"
	controlNS  = "tunmesh"
	trustDom   = "cluster.local"
	identitySA = "system:serviceaccount:tunmesh:tunmesh-identity"
)

// idEnv is the identity fixture shared by the identity tests: RBAC and
// ServiceAccounts from deploy/, a dev trust anchor + issuer, agent pods on
// both nodes, workload pods web (node-1) and db (node-2), and a running
// tunmesh-identity (in-process, authenticated as its own ServiceAccount
// through impersonation so its RBAC is the deployed one).
type idEnv struct {
	c         *cluster
	dir       string
	rootCert  *x509.Certificate
	rootKey   *ecdsa.PrivateKey
	anchors   *ca.Anchors
	svc       *service.Service
	addr      string
	agentPods map[string]*corev1.Pod // by node
	web, db   spiffe.ID
	saClient  kubernetes.Interface
	stopSvc   context.CancelFunc
	svcDone   chan error
}

var (
	idOnce  sync.Once
	idShare *idEnv
	idErr   error
)

func identity(t testing.TB) *idEnv {
	t.Helper()
	c := need(t)
	idOnce.Do(func() { idShare, idErr = setupIdentity(c) })
	if idErr != nil {
		t.Fatalf("identity fixture: %v", idErr)
	}
	return idShare
}

func setupIdentity(c *cluster) (*idEnv, error) {
	ctx := context.Background()
	e := &idEnv{c: c, agentPods: map[string]*corev1.Pod{}}
	for _, f := range []string{"namespace.yaml", "identity-rbac.yaml", "node-rbac.yaml"} {
		if out, err := c.KubectlErr("apply", "-f", filepath.Join("..", "..", "deploy", f)); err != nil {
			return nil, fmt.Errorf("apply %s: %v\n%s", f, err, out)
		}
	}
	var err error
	if e.dir, err = os.MkdirTemp("", "tunmesh-identity-e2e-"); err != nil {
		return nil, err
	}
	now := time.Now()
	if e.rootCert, e.rootKey, err = ca.NewRoot("tunmesh e2e root", 365*24*time.Hour, now); err != nil {
		return nil, err
	}
	if e.anchors, err = ca.ParseAnchors(ca.EncodeCertPEM(e.rootCert)); err != nil {
		return nil, err
	}
	iss, secret, err := e.newIssuer("issuer-1", e.rootCert, e.rootKey)
	if err != nil {
		return nil, err
	}
	if _, err := c.Client.CoreV1().Secrets(controlNS).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create issuer secret: %w", err)
	}
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: idNS}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	for _, sa := range []string{"web", "db"} {
		if _, err := c.Client.CoreV1().ServiceAccounts(idNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}
	for _, node := range []string{"node-1", "node-2"} {
		p, err := runPod(ctx, c, controlNS, "agent-"+node, "tunmesh-node", node, map[string]string{"app": "tunmesh-node"})
		if err != nil {
			return nil, err
		}
		e.agentPods[node] = p
	}
	if _, err := runPod(ctx, c, idNS, "web", "web", "node-1", nil); err != nil {
		return nil, err
	}
	if _, err := runPod(ctx, c, idNS, "db", "db", "node-2", nil); err != nil {
		return nil, err
	}
	e.web = spiffe.ID{TrustDomain: trustDom, Namespace: idNS, ServiceAccount: "web"}
	e.db = spiffe.ID{TrustDomain: trustDom, Namespace: idNS, ServiceAccount: "db"}

	if e.saClient, err = c.Impersonating(identitySA); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	e.addr = ln.Addr().String()
	if err := e.startService(ln, iss, ca.Config{TrustDomain: trustDom, ControlNamespace: controlNS}); err != nil {
		return nil, err
	}
	return e, nil
}

// startService runs a tunmesh-identity on ln until stopService.
func (e *idEnv) startService(ln net.Listener, iss *ca.Issuer, cfg ca.Config) error {
	authority, err := ca.New(cfg, iss, e.anchors)
	if err != nil {
		return err
	}
	svc, err := service.New(service.Config{}, e.saClient, authority, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		return err
	}
	svc.Listener(ln)
	ctx, cancel := context.WithCancel(context.Background())
	e.svc, e.stopSvc, e.svcDone = svc, cancel, make(chan error, 1)
	go func() { e.svcDone <- svc.Run(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for !svc.Ready() {
		select {
		case err := <-e.svcDone:
			return fmt.Errorf("identity service exited: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("identity service not ready after 30s")
		}
	}
	return nil
}

func (e *idEnv) stopService() error {
	e.stopSvc()
	return <-e.svcDone
}

// newIssuer makes an intermediate under parent and its Secret.
func (e *idEnv) newIssuer(cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ca.Issuer, *corev1.Secret, error) {
	cert, key, err := ca.NewIntermediate(parent, parentKey, cn, 180*24*time.Hour, time.Now())
	if err != nil {
		return nil, nil, err
	}
	certPEM := ca.EncodeCertPEM(cert)
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	iss, err := ca.ParseIssuer(certPEM, keyPEM, e.anchors, time.Now())
	if err != nil {
		return nil, nil, err
	}
	return iss, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-identity-issuer", Namespace: controlNS},
		Type:       corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       certPEM,
			corev1.TLSPrivateKeyKey: keyPEM,
			"ca.crt":                ca.EncodeCertPEM(parent),
		},
	}, nil
}

func runPod(ctx context.Context, c *cluster, ns, name, sa, node string, labels map[string]string) (*corev1.Pod, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			NodeSelector:       map[string]string{"kubernetes.io/hostname": node},
			Containers:         []corev1.Container{{Name: "main", Image: "tunmesh-workload", Args: []string{"sleep"}}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", ns, name, err)
	}
	var got *corev1.Pod
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		p, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning {
			return p, nil
		}
		got = p
		time.Sleep(200 * time.Millisecond)
	}
	return nil, fmt.Errorf("pod %s/%s not running: %+v", ns, name, got)
}

// token requests a projected token for sa, bound to pod, for audience.
func (e *idEnv) token(t testing.TB, ns, sa string, pod *corev1.Pod, audience string) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         []string{audience},
		ExpirationSeconds: new(int64(600)),
	}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := e.c.Client.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create token for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// client returns an identity client that presents token.
func (e *idEnv) client(t testing.TB, token string) *workload.Client {
	t.Helper()
	f := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(f, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	cl, err := workload.NewClient("https://"+e.addr, e.svc.ServerName(), e.anchors.Pool(), f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func csr(t testing.TB) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func refusalCode(err error) api.Code {
	var apiErr *api.Error
	if errors.As(err, &apiErr) {
		return apiErr.Code
	}
	return ""
}

func TestIdentityIssuesOnlyForIdentitiesOnTheAgentsNode(t *testing.T) {
	e := identity(t)
	agent1 := e.client(t, e.token(t, controlNS, "tunmesh-node", e.agentPods["node-1"], api.Audience))
	ctx := context.Background()

	chain, err := agent1.Certify(ctx, e.web, csr(t))
	if err != nil {
		t.Fatalf("agent on node-1 certifying web (on node-1): %v", err)
	}
	checkLeafWithOpenSSL(t, e, chain, e.web)

	_, err = agent1.Certify(ctx, e.db, csr(t))
	if code := refusalCode(err); code != api.CodeIdentityNotOnNode {
		t.Errorf("agent on node-1 certifying db (on node-2): got %v, want code %s", err, api.CodeIdentityNotOnNode)
	}
	agent2 := e.client(t, e.token(t, controlNS, "tunmesh-node", e.agentPods["node-2"], api.Audience))
	if _, err := agent2.Certify(ctx, e.db, csr(t)); err != nil {
		t.Errorf("agent on node-2 certifying db: %v", err)
	}

	cases := []struct {
		name  string
		token string
		want  api.Code
	}{
		{"token of another audience", e.token(t, controlNS, "tunmesh-node", e.agentPods["node-1"], "some-other-service"), api.CodeUnauthenticated},
		{"non-agent service account", e.token(t, idNS, "web", nil, api.Audience), api.CodeNotAgent},
		{"agent token not bound to a pod", e.token(t, controlNS, "tunmesh-node", nil, api.Audience), api.CodeAgentPodUnknown},
		{"expired agent token", e.forgeToken(t, e.agentPods["node-1"], time.Now().Add(-time.Hour)), api.CodeUnauthenticated},
		{"garbage token", "not-a-jwt", api.CodeUnauthenticated},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.client(t, tc.token).Certify(ctx, e.web, csr(t))
			if code := refusalCode(err); code != tc.want {
				t.Fatalf("got %v, want code %s", err, tc.want)
			}
		})
	}
	// The forged-token path is sound: the same token with a future expiry is accepted.
	if _, err := e.client(t, e.forgeToken(t, e.agentPods["node-1"], time.Now().Add(time.Hour))).Certify(ctx, e.web, csr(t)); err != nil {
		t.Errorf("forged but unexpired agent token refused (the expired case proves nothing then): %v", err)
	}

	// Bad CSRs: wrong key algorithm and foreign SANs.
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	bad384, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, p384)
	if _, err := agent1.Certify(ctx, e.web, bad384); refusalCode(err) != api.CodeKeyAlgorithm {
		t.Errorf("P-384 CSR: got %v, want %s", err, api.CodeKeyAlgorithm)
	}
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	foreign, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"evil.example"}}, p256)
	if _, err := agent1.Certify(ctx, e.web, foreign); refusalCode(err) != api.CodeSANMismatch {
		t.Errorf("CSR with foreign SAN: got %v, want %s", err, api.CodeSANMismatch)
	}
	if _, err := agent1.Certify(ctx, e.web, []byte("garbage")); refusalCode(err) != api.CodeBadCSR {
		t.Errorf("garbage CSR: got %v, want %s", err, api.CodeBadCSR)
	}
}

// checkLeafWithOpenSSL verifies the chain with openssl against the anchor
// and checks the SANs are exactly the SPIFFE URI and the DNS name.
func checkLeafWithOpenSSL(t *testing.T, e *idEnv, chain [][]byte, id spiffe.ID) {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, ders ...[]byte) string {
		var b []byte
		for _, d := range ders {
			b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d})...)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	anchor := write("anchor.pem", e.rootCert.Raw)
	inter := write("issuer.pem", chain[1:]...)
	leaf := write("leaf.pem", chain[0])
	if out, err := exec.Command("openssl", "verify", "-CAfile", anchor, "-untrusted", inter, leaf).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
	out, err := exec.Command("openssl", "x509", "-in", leaf, "-noout", "-ext", "subjectAltName").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, out)
	}
	want := fmt.Sprintf("DNS:%s, URI:%s", id.DNSName(controlNS), id.String())
	if got := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[1]); got != want {
		t.Errorf("SANs: got %q, want %q", got, want)
	}
}

// forgeToken signs a bound agent token with the cluster's service-account
// key, with the given expiry: the only way to get an expired token quickly
// (TokenRequest refuses lifetimes under 10 minutes).
func (e *idEnv) forgeToken(t *testing.T, pod *corev1.Pod, exp time.Time) string {
	t.Helper()
	keyPEM, err := os.ReadFile(filepath.Join(testRoot, e.c.Name, "pki", "sa.key"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(keyPEM)
	key, err := x509.ParseECPrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	sa, err := e.c.Client.CoreV1().ServiceAccounts(controlNS).Get(context.Background(), "tunmesh-node", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	kid := sha256.Sum256(pubDER)
	header := map[string]string{"alg": "ES256", "kid": base64.RawURLEncoding.EncodeToString(kid[:])}
	iat := exp.Add(-time.Hour)
	claims := map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"aud": []string{api.Audience},
		"sub": "system:serviceaccount:" + controlNS + ":tunmesh-node",
		"exp": exp.Unix(), "iat": iat.Unix(), "nbf": iat.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      controlNS,
			"serviceaccount": map[string]string{"name": "tunmesh-node", "uid": string(sa.UID)},
			"pod":            map[string]string{"name": pod.Name, "uid": string(pod.UID)},
		},
	}
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signing := enc(header) + "." + enc(claims)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}
