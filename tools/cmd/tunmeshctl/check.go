package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

// runCheck runs the identity checks against a cluster: the trust anchors
// and issuer from the issuer Secret, and the leaves every running agent
// serves (fetched through the API server's pod proxy).
func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tunmeshctl check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig (default $KUBECONFIG)")
	ns := fs.String("namespace", "tunmesh", "tunmesh's control namespace")
	secret := fs.String("issuer-secret", identitycli.DefaultSecretName, "issuer Secret (tls.crt, ca.crt)")
	agentSelector := fs.String("agent-selector", "app=tunmesh-node", "label selector of the node agent pods")
	minValidity := fs.Duration("min-validity", identitycli.DefaultMinValidity, "anchors and issuer must stay valid this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "tunmeshctl check: %v\n", err)
		return 1
	}
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		&clientcmd.ClientConfigLoadingRules{ExplicitPath: *kubeconfig}, nil).ClientConfig()
	if err != nil {
		return fail(fmt.Errorf("kubeconfig: %w", err))
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fail(err)
	}
	now := time.Now()
	sec, err := client.CoreV1().Secrets(*ns).Get(ctx, *secret, metav1.GetOptions{})
	if err != nil {
		return fail(fmt.Errorf("read issuer secret %s/%s: %w", *ns, *secret, err))
	}
	anchors, err := ca.ParseAnchors(sec.Data["ca.crt"])
	if err != nil {
		return fail(fmt.Errorf("trust anchors in %s/%s ca.crt: %w", *ns, *secret, err))
	}
	issuerCerts, err := ca.ParseCertificatesPEM(sec.Data[corev1.TLSCertKey])
	if err != nil || len(issuerCerts) == 0 {
		return fail(fmt.Errorf("issuer in %s/%s tls.crt: %v", *ns, *secret, err))
	}
	checks := identitycli.CheckAnchorsAndIssuer(anchors, &ca.Issuer{Certificate: issuerCerts[0], Chain: issuerCerts[1:]}, now, *minValidity)

	chains, agents, err := agentLeaves(ctx, client, *ns, *agentSelector)
	if err != nil {
		checks = append(checks, identitycli.Check{Name: "workload certificates chain to the current trust anchors", Hint: err.Error()})
	} else {
		c := identitycli.CheckLeaves(anchors, chains, now)
		c.Name += fmt.Sprintf(" (%d certificates from %d agents)", len(chains), agents)
		checks = append(checks, c)
	}
	if !identitycli.PrintChecks(stdout, checks) {
		return 1
	}
	return 0
}

// agentLeaves fetches the workload certificate chains of every running
// agent through the API server's pod proxy.
func agentLeaves(ctx context.Context, client kubernetes.Interface, ns, selector string) ([][]*x509.Certificate, int, error) {
	pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, 0, fmt.Errorf("list agent pods: %w", err)
	}
	var chains [][]*x509.Certificate
	agents := 0
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodRunning {
			continue
		}
		agents++
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		body, err := client.CoreV1().Pods(ns).ProxyGet("http", p.Name, strconv.Itoa(workload.AdminPort), workload.CertificatesPath, nil).DoRaw(pctx)
		cancel()
		if err != nil {
			return nil, agents, fmt.Errorf("agent %s on %s: fetch certificates: %w", p.Name, p.Spec.NodeName, err)
		}
		var list []workload.CertificateChain
		if err := json.Unmarshal(body, &list); err != nil {
			return nil, agents, fmt.Errorf("agent %s: decode certificates: %w", p.Name, err)
		}
		for _, cc := range list {
			var chain []*x509.Certificate
			for _, pemText := range cc.Chain {
				certs, err := ca.ParseCertificatesPEM([]byte(pemText))
				if err != nil {
					return nil, agents, fmt.Errorf("agent %s, %s: %w", p.Name, cc.Identity, err)
				}
				chain = append(chain, certs...)
			}
			chains = append(chains, chain)
		}
	}
	if agents == 0 {
		return nil, 0, fmt.Errorf("no running agent pods (%s) in namespace %s", selector, ns)
	}
	return chains, agents, nil
}
