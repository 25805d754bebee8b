package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// serveAgentCertificates runs a certificate manager for the agent on node,
// holding ids, and serves its certificate check (workload.VerifyPath)
// inside the agent pod's network namespace on the admin port, as the node
// agent does.
func (e *idEnv) serveAgentCertificates(t *testing.T, node string, ids ...spiffe.ID) {
	t.Helper()
	client := e.client(t, e.token(t, controlNS, "tunmesh-node", e.agentPods[node], api.Audience))
	mgr, err := workload.NewManager(workload.ManagerConfig{}, client, e.anchors.Pool(), prometheus.NewRegistry(), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Run(ctx) }()
	for _, id := range ids {
		mgr.Acquire(id)
		cctx, ccancel := context.WithTimeout(ctx, 20*time.Second)
		if _, err := mgr.Certificate(cctx, id); err != nil {
			t.Fatalf("agent on %s: certificate for %s: %v", node, id, err)
		}
		ccancel()
	}
	ln, err := namedns.Listen(e.c.PodNetns(e.agentPods[node]), "tcp", fmt.Sprintf(":%d", workload.AdminPort))
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+workload.VerifyPath, mgr.VerifyHandler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		cancel()
		<-done
	})
}

// TestCheck: `tunmeshctl check` passes on a healthy cluster (anchors and
// issuer from the issuer Secret, every agent asked through the API server's
// pod proxy whether its leaves chain to the current anchors) and fails with a hint when the anchor
// expires within 60 days.
func TestCheck(t *testing.T) {
	e := identity(t)
	_, healthy, err := e.newIssuer("issuer-check", e.rootCert, e.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.updateIssuerSecret(t, healthy)
	e.waitEvent(t, "IssuerUpdated", "issuer-check", start)
	e.serveAgentCertificates(t, "node-1", e.web)
	e.serveAgentCertificates(t, "node-2", e.db)

	check := func() (string, error) {
		cmd := exec.Command(filepath.Join(e.c.BinDir, "tunmeshctl"), "check", "--kubeconfig", e.c.State.Kubeconfig)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := check()
	if err != nil {
		t.Fatalf("check on a healthy cluster failed: %v\n%s", err, out)
	}
	for _, want := range []string{
		"√ trust anchors use supported algorithm",
		"√ issuer certificate is issued by the trust anchor",
		"√ workload certificates chain to the current trust anchors (2 certificates from 2 agents)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}

	// An anchor that expires in 30 days fails the 60-day check, with a hint.
	root, rootKey, err := ca.NewRoot("short-lived root", 30*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.NewIntermediate(root, rootKey, "issuer-short", 20*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	expiring := healthy.DeepCopy()
	expiring.Data["ca.crt"], expiring.Data["tls.crt"], expiring.Data["tls.key"] = ca.EncodeCertPEM(root), ca.EncodeCertPEM(cert), keyPEM
	e.updateIssuerSecret(t, expiring)
	t.Cleanup(func() { e.updateIssuerSecret(t, healthy) })
	out, err = check()
	if err == nil {
		t.Fatalf("check passed with an anchor expiring in 30 days:\n%s", out)
	}
	if !strings.Contains(out, "× trust anchors are valid for at least 60 days") || !strings.Contains(out, "see:") {
		t.Errorf("check output lacks the failed 60-day line with a hint:\n%s", out)
	}
	// The agents' leaves chain to the old anchor, not the new one: caught too.
	if !strings.Contains(out, "× workload certificates chain to the current trust anchors") {
		t.Errorf("check did not flag leaves that chain to the previous anchor:\n%s", out)
	}
}

// TestIdentityBootstrapWithBinary: the output of `tunmeshctl identity
// bootstrap` (files and Secret manifest) runs the real tunmesh-identity
// binary, which then issues a certificate verified against the bootstrap
// anchor.
func TestIdentityBootstrapWithBinary(t *testing.T) {
	e := identity(t)
	dir := t.TempDir()
	const secretName = "tunmesh-identity-issuer-bootstrap"
	ctl := filepath.Join(e.c.BinDir, "tunmeshctl")
	if out, err := exec.Command(ctl, "identity", "bootstrap", "--dir", dir, "--secret-name", secretName).CombinedOutput(); err != nil {
		t.Fatalf("bootstrap: %v\n%s", err, out)
	}
	if out, err := exec.Command(ctl, "identity", "inspect", filepath.Join(dir, "tls.crt")).CombinedOutput(); err != nil || !strings.Contains(string(out), "CA") {
		t.Fatalf("inspect issuer: %v\n%s", err, out)
	}
	e.c.Kubectl(t, "apply", "-f", filepath.Join(dir, "issuer-secret.yaml"))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := devcluster.ImpersonatingKubeconfig(e.c.Cfg(), e.c.State, kubeconfig, identitySA); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(e.c.BinDir, "tunmesh-identity"),
		"--addr", addr, "--metrics-addr", "", "--issuer-dir", dir, "--issuer-secret", secretName, "--kubeconfig", kubeconfig)
	logs := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	})

	anchorsPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	anchors, err := ca.ParseAnchors(anchorsPEM)
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(e.token(t, controlNS, "tunmesh-node", e.agentPods["node-1"], api.Audience)), 0o600); err != nil {
		t.Fatal(err)
	}
	serverName := spiffe.ControlPlaneDNSName("tunmesh-identity", controlNS, trustDom)
	client, err := workload.NewClient("https://"+addr, serverName, anchors.Pool(), tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	waitFor(t, 30*time.Second, "tunmesh-identity binary to issue a certificate", func() error {
		chain, err := client.Certify(context.Background(), e.web, csr(t))
		if err != nil {
			return fmt.Errorf("%v (logs: %s)", err, logs.String())
		}
		if len(chain) < 2 {
			return fmt.Errorf("chain of %d", len(chain))
		}
		return nil
	})
}
