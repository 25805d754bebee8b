package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// agentFlags are how capture, tap and edges reach the node agents: the
// agent's observability API on each node's address (InternalIP) and
// --agent-port, over TLS. The caller proves who it is with the
// kubeconfig's client certificate (the agent follows the cluster's client
// CA), or with a token given explicitly for the agents (--agent-token,
// --agent-token-file) that is bound to the audience tunmesh.io/observe:
// the kubeconfig's own token (or an exec plugin's) is never sent to a node,
// where a compromised agent would collect it and use it against the API
// server. The agent checks the caller with a SubjectAccessReview. --netns
// dials from inside a named network namespace (the local cluster's nodes
// sit in namespaces: use <cluster>-cp, the control plane's).
type agentFlags struct {
	port      int
	netns     string
	insecure  bool
	token     string
	tokenFile string
}

func (f *agentFlags) add(cmd *cobra.Command) {
	cmd.Flags().IntVar(&f.port, "agent-port", observeapi.DefaultPort, "the agents' observability API port")
	cmd.Flags().StringVar(&f.netns, "netns", "", "dial the agents from inside this named network namespace (local cluster: <name>-cp)")
	cmd.Flags().BoolVar(&f.insecure, "insecure-skip-agent-verify", false, "accept any agent certificate when its Node does not publish one (credentials may reach an impostor)")
	cmd.Flags().StringVar(&f.token, "agent-token", "", "a token for the node agents, bound to their audience: kubectl create token SA --audience "+observeapi.TokenAudience+" (default: the kubeconfig's client certificate; its token is never sent to the agents)")
	cmd.Flags().StringVar(&f.tokenFile, "agent-token-file", "", "read --agent-token from this file")
}

// agents is a connected client of the agents' observability API.
type agents struct {
	client   kubernetes.Interface
	http     *http.Client
	port     int
	token    string
	insecure bool
	pins     sync.Map // host -> the certificate fingerprint its Node publishes ("" : none)
	// noCredential, when the caller has neither a client certificate nor
	// an agent token, says why and what to do (added to a 401).
	noCredential string
}

// errNoAgentCredential: the agent refused a caller that sent no credential.
var errNoAgentCredential = errors.New("no credential for the node agents")

func newAgents(cf *genericclioptions.ConfigFlags, f agentFlags) (*agents, error) {
	rc, err := cf.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	// The agents' serving certificates are their own (self-signed unless
	// the install gives one): each agent publishes its certificate's
	// SHA-256 on its Node, read here through the API server, and only that
	// certificate is accepted from the node's address (verifyAgent).
	a := &agents{port: f.port, insecure: f.insecure, token: f.token}
	if a.token == "" && f.tokenFile != "" {
		b, err := os.ReadFile(f.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read agent token file: %w", err)
		}
		a.token = strings.TrimSpace(string(b))
	}
	tlsCfg := &tls.Config{}
	if a.token == "" {
		// Only the client certificate is taken from the kubeconfig (an exec
		// plugin may supply one): rest.TLSConfigFor carries no token.
		c, err := rest.TLSConfigFor(rc)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig TLS: %w", err)
		}
		if c != nil {
			tlsCfg = c
		}
		a.noCredential = missingCredential(rc)
	}
	// With --agent-token the caller acts as the token's user: the
	// kubeconfig's certificate is not offered (it would win at the agent).
	dial := (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	if f.netns != "" {
		dial = namedns.Dialer(f.netns)
	}
	a.setTransport(tlsCfg, dial)
	a.client = client
	return a, nil
}

// missingCredential explains, for a kubeconfig without a client
// certificate, why the agents will refuse the caller ("" when it has one
// or an exec plugin may provide one).
func missingCredential(rc *rest.Config) string {
	if len(rc.CertData) > 0 || rc.CertFile != "" {
		return ""
	}
	how := "a token"
	switch {
	case rc.ExecProvider != nil:
		how = "an exec plugin (" + rc.ExecProvider.Command + ")"
	case rc.AuthProvider != nil:
		how = "the auth provider " + rc.AuthProvider.Name
	case rc.BearerToken == "" && rc.BearerTokenFile == "":
		how = "no credential"
	}
	return fmt.Sprintf("the kubeconfig authenticates with %s and has no client certificate; tunmeshctl never sends the API server's credentials to node agents: "+
		"pass --agent-token \"$(kubectl create token SERVICEACCOUNT --audience %s)\" (the ServiceAccount needs the RBAC of docs/observability.md), or use a kubeconfig with a client certificate",
		how, observeapi.TokenAudience)
}

// setTransport makes the HTTP client: TLS 1.3 with base's client
// certificate, the agent's certificate accepted only if it is the one the
// agent's Node publishes (verifyAgent, checked per dialed address).
func (a *agents) setTransport(base *tls.Config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) {
	base = base.Clone()
	base.RootCAs, base.InsecureSkipVerify, base.ServerName = nil, true, ""
	base.MinVersion = tls.VersionTLS13
	base.NextProtos = []string{"http/1.1"} // the dialed conn is handed to HTTP/1
	tr := &http.Transport{ForceAttemptHTTP2: false, ResponseHeaderTimeout: 30 * time.Second}
	tr.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		raw, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		cfg := base.Clone()
		cfg.VerifyConnection = func(cs tls.ConnectionState) error { return a.verifyAgent(host, cs) }
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, err
		}
		return tc, nil
	}
	a.http = &http.Client{Transport: tr}
}

// errAgentCertificate: the agent's certificate is not the one its Node
// publishes (or none is published): nothing was sent to it.
var errAgentCertificate = errors.New("agent certificate not verified")

// verifyAgent accepts the agent's certificate only if its SHA-256 is the
// one the agent's Node publishes (observeapi.FingerprintAnnotation).
func (a *agents) verifyAgent(host string, cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("no certificate: %w", errAgentCertificate)
	}
	v, ok := a.pins.Load(host)
	want, _ := v.(string)
	if !ok || want == "" {
		if a.insecure {
			return nil
		}
		return fmt.Errorf("the node of %s publishes no %s (an agent older than the observability API, or one that could not patch its Node; --insecure-skip-agent-verify to go on): %w",
			host, observeapi.FingerprintAnnotation, errAgentCertificate)
	}
	sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
	if got := hex.EncodeToString(sum[:]); got != want {
		return fmt.Errorf("%s presents certificate %s, its Node publishes %s (the agent restarted: retry): %w", host, got, want, errAgentCertificate)
	}
	return nil
}

// nodeAddr is a node's InternalIP (else its first address).
func (a *agents) nodeAddr(ctx context.Context, node string) (addr string, err error) {
	n, err := a.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get node %s: %w", node, err)
	}
	defer func() {
		if addr != "" {
			a.pins.Store(addr, n.Annotations[observeapi.FingerprintAnnotation])
		}
	}()
	var first string
	for _, ad := range n.Status.Addresses {
		if ad.Type == corev1.NodeInternalIP {
			return ad.Address, nil
		}
		if first == "" {
			first = ad.Address
		}
	}
	if first == "" {
		return "", fmt.Errorf("node %s has no address", node)
	}
	return first, nil
}

// nodes lists every node's name.
func (a *agents) nodes(ctx context.Context) ([]string, error) {
	list, err := a.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	var out []string
	for _, n := range list.Items {
		out = append(out, n.Name)
	}
	sort.Strings(out)
	return out, nil
}

// get calls an agent's API on node; the caller closes the body. A refusal
// (401, 403, 404, ...) is an error with the agent's message.
func (a *agents) get(ctx context.Context, node, path string, q url.Values) (*http.Response, error) {
	addr, err := a.nodeAddr(ctx, node)
	if err != nil {
		return nil, err
	}
	u := url.URL{Scheme: "https", Host: net.JoinHostPort(addr, strconv.Itoa(a.port)), Path: path, RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent on %s: %w", node, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		e := &agentError{node: node, status: resp.StatusCode, msg: strings.TrimSpace(string(msg))}
		if resp.StatusCode == http.StatusUnauthorized && a.token == "" && a.noCredential != "" {
			return nil, fmt.Errorf("%w: %s: %w", e, a.noCredential, errNoAgentCredential)
		}
		return nil, e
	}
	return resp, nil
}

// agentError is an agent's refusal.
type agentError struct {
	node   string
	status int
	msg    string
}

func (e *agentError) Error() string {
	return fmt.Sprintf("agent on %s: %s: %s", e.node, http.StatusText(e.status), e.msg)
}

// errForbidden lets callers tell a refusal from a failure.
var errForbidden = errors.New("forbidden")

func (e *agentError) Is(target error) bool {
	return target == errForbidden && (e.status == http.StatusForbidden || e.status == http.StatusUnauthorized)
}

// resolvePods turns POD or deploy/NAME (also deployment/, ds/, sts/) in
// ns into running pods.
func resolvePods(ctx context.Context, client kubernetes.Interface, ns, ref string) ([]corev1.Pod, error) {
	kind, name, ok := strings.Cut(ref, "/")
	if !ok {
		p, err := client.CoreV1().Pods(ns).Get(ctx, ref, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get pod %s/%s: %w", ns, ref, err)
		}
		return []corev1.Pod{*p}, nil
	}
	if kind == "pod" || kind == "pods" || kind == "po" {
		return resolvePods(ctx, client, ns, name)
	}
	var sel *metav1.LabelSelector
	switch kind {
	case "deploy", "deployment", "deployments":
		d, err := client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get deployment %s/%s: %w", ns, name, err)
		}
		sel = d.Spec.Selector
	case "ds", "daemonset", "daemonsets":
		d, err := client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get daemonset %s/%s: %w", ns, name, err)
		}
		sel = d.Spec.Selector
	case "sts", "statefulset", "statefulsets":
		var s *appsv1.StatefulSet
		s, err := client.AppsV1().StatefulSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get statefulset %s/%s: %w", ns, name, err)
		}
		sel = s.Spec.Selector
	default:
		return nil, fmt.Errorf("resource %q: want POD, pod/NAME, deploy/NAME, ds/NAME or sts/NAME", ref)
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return nil, err
	}
	list, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: s.String()})
	if err != nil {
		return nil, fmt.Errorf("list pods of %s: %w", ref, err)
	}
	var out []corev1.Pod
	for _, p := range list.Items {
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s/%s has no running pod", ns, ref)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// namespaceOf is -n, else the kubeconfig context's namespace.
func namespaceOf(cf *genericclioptions.ConfigFlags) (string, error) {
	ns, _, err := cf.ToRawKubeConfigLoader().Namespace()
	if err != nil {
		return "", fmt.Errorf("namespace: %w", err)
	}
	return ns, nil
}
