package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/node/observeapi"
)

// TestAgentsNeverSendTheKubeconfigToken: from a kubeconfig that holds only
// a bearer token, tunmeshctl calls the agent with no Authorization header
// (the agent refuses, and the error says what to do); a token given with
// --agent-token is sent, and then no client certificate is offered.
func TestAgentsNeverSendTheKubeconfigToken(t *testing.T) {
	type seen struct {
		auth string
		cert bool
	}
	var got []seen
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, seen{r.Header.Get("Authorization"), r.TLS != nil && len(r.TLS.PeerCertificates) > 0})
		if r.Header.Get("Authorization") == "" {
			http.Error(w, "no client certificate and no bearer token: unauthenticated", http.StatusUnauthorized)
			return
		}
		_, _ = w.Write([]byte("[]"))
	}))
	srv.StartTLS()
	t.Cleanup(srv.Close)
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	sum := sha256.Sum256(srv.Certificate().Raw)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: map[string]string{observeapi.FingerprintAnnotation: hex.EncodeToString(sum[:])}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: host}}}}

	kubeconfig := filepath.Join(t.TempDir(), "config")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: api-server-secret}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	call := func(f agentFlags) error {
		cf := genericclioptions.NewConfigFlags(false)
		cf.KubeConfig = &kubeconfig
		f.port = p
		a, err := newAgents(cf, f)
		if err != nil {
			t.Fatal(err)
		}
		a.client = fake.NewClientset(node.DeepCopy())
		resp, err := a.get(context.Background(), "n1", observeapi.EdgesPath, nil)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}

	err := call(agentFlags{})
	if len(got) != 1 || got[0].auth != "" {
		t.Fatalf("token-only kubeconfig: the agent got %+v; want no Authorization header", got)
	}
	if !errors.Is(err, errNoAgentCredential) || !strings.Contains(err.Error(), "--audience "+observeapi.TokenAudience) || !strings.Contains(err.Error(), "--agent-token") {
		t.Fatalf("token-only kubeconfig: err %v; want the hint to mint an audience-bound token", err)
	}

	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("observe-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got = nil
	for _, f := range []agentFlags{{token: "observe-token"}, {tokenFile: tokenFile}} {
		if err := call(f); err != nil {
			t.Fatalf("%+v: %v", f, err)
		}
	}
	for _, g := range got {
		if g.auth != "Bearer observe-token" || g.cert {
			t.Fatalf("explicit agent token: the agent got %+v", got)
		}
	}
}
