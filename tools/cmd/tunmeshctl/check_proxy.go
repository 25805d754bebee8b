package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
	"github.com/tunmesh/tunmesh/tools/internal/installcli"
)

// checkProxy runs `check --proxy`: the agents' /status through the API
// server's pod proxy, the meshed pods' certificates from the agents'
// observability API, checked against the issuer Secret's trust anchors.
func checkProxy(ctx context.Context, cf *genericclioptions.ConfigFlags, client kubernetes.Interface, ns string, o checkOptions) ([]identitycli.Check, error) {
	sec, err := client.CoreV1().Secrets(ns).Get(ctx, o.secret, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read issuer secret %s/%s: %w", ns, o.secret, err)
	}
	anchors, err := ca.ParseAnchors(sec.Data["ca.crt"])
	if err != nil {
		return nil, fmt.Errorf("trust anchors in %s/%s ca.crt: %w", ns, o.secret, err)
	}
	ag, err := newAgents(cf, o.agents)
	if err != nil {
		return nil, err
	}
	certs := func(ctx context.Context, node string) ([]observeapi.PodCert, error) {
		ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		resp, err := ag.get(ctx, node, observeapi.PodsPath, url.Values{})
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var pcs []observeapi.PodCert
		if err := json.NewDecoder(resp.Body).Decode(&pcs); err != nil {
			return nil, fmt.Errorf("decode pods of %s: %w", node, err)
		}
		return pcs, nil
	}
	return installcli.CheckProxy(ctx, client, ns, o.agentSelector, anchors.Pool(), time.Now(), installcli.ProxyStatus(client), certs)
}
