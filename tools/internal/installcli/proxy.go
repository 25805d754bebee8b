package installcli

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

// PodCertFetcher returns the meshed pods of a node and their certificates
// (the agent's observability API, GET /v1/pods).
type PodCertFetcher func(ctx context.Context, node string) ([]observeapi.PodCert, error)

// Names of the `check --proxy` checks.
const (
	CheckProxyAgents = "an agent runs and is ready on every node"
	CheckProxyCerts  = "every meshed pod has a current certificate chaining to the trust anchors"
	CheckProxyVer    = "agents run the control plane's version"
)

// CheckProxy runs the data-plane checks of `tunmeshctl check --proxy`: an
// agent pod (selector, in ns) on every node whose /status says ready; one
// version across the agents, equal to tunmesh-identity's image tag when it
// runs as the Deployment; every node's conflist chaining tunmesh-cni; and
// every pod the agents mesh holding a certificate that is current at now,
// names the pod's identity and chains to anchors. It works on any install
// (DaemonSet or processes with placeholder pods, as on the local cluster).
func CheckProxy(ctx context.Context, client kubernetes.Interface, ns, selector string, anchors *x509.CertPool, now time.Time, status StatusFetcher, certs PodCertFetcher) ([]identitycli.Check, error) {
	nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("list agent pods: %w", err)
	}
	agentOn := map[string]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			agentOn[p.Spec.NodeName] = p
		}
	}
	var names []string
	for _, n := range nodes.Items {
		names = append(names, n.Name)
	}
	sort.Strings(names)

	var notReady, notChained []string
	versions := map[string][]string{}
	var reached []string
	for _, n := range names {
		p := agentOn[n]
		if p == nil {
			notReady = append(notReady, n+" (no running agent pod)")
			continue
		}
		st, err := status(ctx, p)
		if err != nil {
			notReady = append(notReady, fmt.Sprintf("%s (%v)", n, err))
			continue
		}
		reached = append(reached, n)
		versions[st.Version] = append(versions[st.Version], n)
		if !st.Ready {
			var why []string
			for _, c := range st.Checks {
				if !c.OK {
					why = append(why, c.Name+": "+c.Error)
				}
			}
			notReady = append(notReady, fmt.Sprintf("%s (%s)", n, strings.Join(why, "; ")))
		}
		if !st.CNI.Chained {
			why := st.CNI.Error
			if why == "" {
				why = fmt.Sprintf("%s/%s has plugins %v", st.CNI.ConfDir, st.CNI.File, st.CNI.Plugins)
			}
			notChained = append(notChained, n+": "+why)
		}
	}
	ready := identitycli.Check{Name: fmt.Sprintf("%s (%d of %d)", CheckProxyAgents, len(names)-len(notReady), len(names)), OK: len(notReady) == 0 && len(names) > 0}
	if !ready.OK {
		ready.Hint = "not ready: " + nodeList(notReady)
		if len(names) == 0 {
			ready.Hint = "the cluster has no nodes"
		}
	}
	chained := identitycli.Check{Name: CheckCNIChained, OK: len(notChained) == 0 && len(reached) > 0}
	if len(notChained) > 0 {
		chained.Hint = "not chained on " + strings.Join(notChained, "; ")
	} else if len(reached) == 0 {
		chained.Hint = "no agent answered"
	}
	checks := []identitycli.Check{ready, chained, proxyVersion(ctx, client, ns, versions)}

	// Certificates of every meshed pod, as each agent holds them. The
	// identity each should name comes from the Pod (its namespace and
	// ServiceAccount, read from the API), not from the agent: an agent
	// cannot vouch for itself. And every pod the mesh should serve on a
	// node must be in its agent's list.
	want, err := expectedMeshed(ctx, client, ns)
	if err != nil {
		return nil, err
	}
	var bad []string
	total := 0
	for _, n := range reached {
		pcs, err := certs(ctx, n)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", n, err))
			continue
		}
		listed := map[string]bool{}
		for _, pc := range pcs {
			total++
			key := pc.Namespace + "/" + pc.Name
			listed[key] = true
			wp, known := want.pods[key]
			switch {
			case !known || wp.node != n:
				bad = append(bad, fmt.Sprintf("%s on %s: the agent serves a pod the API does not list as running there", key, n))
			case pc.Identity != wp.id:
				bad = append(bad, fmt.Sprintf("%s on %s: the agent reports identity %s, the pod runs as %s", key, n, pc.Identity, wp.id))
			default:
				if err := verifyPodCert(pc, anchors, now); err != nil {
					bad = append(bad, fmt.Sprintf("%s on %s: %v", key, n, err))
				}
			}
		}
		for _, key := range want.onNode[n] {
			if !listed[key] {
				bad = append(bad, fmt.Sprintf("%s on %s: meshed by policy but not served by the node's agent (started before tunmesh, or attached in fail-open: restart it)", key, n))
			}
		}
	}
	cc := identitycli.Check{Name: fmt.Sprintf("%s (%d pods)", CheckProxyCerts, total), OK: len(bad) == 0 && len(reached) > 0}
	if len(bad) > 0 {
		cc.Hint = strings.Join(bad, "; ")
	}
	checks = append(checks, cc)
	return checks, nil
}

// verifyPodCert: the chain's leaf is current, names the pod's identity
// and chains to anchors.
func verifyPodCert(pc observeapi.PodCert, anchors *x509.CertPool, now time.Time) error {
	if pc.Error != "" {
		return errors.New("no certificate: " + pc.Error)
	}
	var chain []*x509.Certificate
	rest := []byte(pc.Chain)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return fmt.Errorf("parse certificate: %w", err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	leaf := chain[0]
	if now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter) {
		return fmt.Errorf("certificate not current (valid %s to %s)", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
	}
	id, err := spiffe.FromCertificate(leaf)
	if err != nil {
		return fmt.Errorf("certificate identity: %w", err)
	}
	if id.String() != pc.Identity {
		return fmt.Errorf("certificate names %s, the pod is %s", id, pc.Identity)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: anchors, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("does not chain to the trust anchors: %w", err)
	}
	return nil
}

// proxyVersion: one version across the agents, and tunmesh-identity's
// image tag when it runs as the Deployment (a local cluster runs it as a
// process: then only the agents are compared).
func proxyVersion(ctx context.Context, client kubernetes.Interface, ns string, versions map[string][]string) identitycli.Check {
	c := identitycli.Check{Name: CheckProxyVer, OK: true}
	var vs []string
	for v := range versions {
		vs = append(vs, v)
	}
	sort.Strings(vs)
	if len(vs) > 1 {
		var parts []string
		for _, v := range vs {
			parts = append(parts, fmt.Sprintf("%q on %s", v, nodeList(versions[v])))
		}
		c.OK, c.Hint = false, "agents report different versions: "+strings.Join(parts, ", ")
		return c
	}
	if len(vs) == 0 {
		c.OK, c.Hint = false, "no agent reported its version"
		return c
	}
	dep, err := client.AppsV1().Deployments(ns).Get(ctx, deploy.IdentityName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		c.Name += fmt.Sprintf(" (%s; tunmesh-identity is not a Deployment here: agents compared among themselves)", vs[0])
	case err != nil:
		c.OK, c.Hint = false, fmt.Sprintf("read Deployment %s/%s: %v", ns, deploy.IdentityName, err)
	default:
		tag := "latest"
		for _, ct := range dep.Spec.Template.Spec.Containers {
			tag = imageTag(ct.Image)
		}
		if tag != vs[0] {
			c.OK, c.Hint = false, fmt.Sprintf("agents run %q, tunmesh-identity %q: finish the upgrade with tunmeshctl install --tag T | kubectl apply -f -", vs[0], tag)
		} else {
			c.Name += " (" + tag + ")"
		}
	}
	return c
}

// meshedPods is what the API says the agents should serve.
type meshedPods struct {
	pods   map[string]runningPod // ns/name -> every running pod
	onNode map[string][]string   // node -> ns/name of its pods the policy meshes
}

// runningPod is a pod's node and SPIFFE ID.
type runningPod struct{ node, id string }

// expectedMeshed reads the running pods, their namespaces and the trust
// domain (tunmesh-config's trustDomain, default cluster.local), and works
// out each pod's identity and whether the mesh policy meshes it (as the
// agents do: not host-network, not in kube-system or the control
// namespace, not opted out by annotation).
func expectedMeshed(ctx context.Context, client kubernetes.Interface, controlNS string) (meshedPods, error) {
	td := "cluster.local"
	if cm, err := client.CoreV1().ConfigMaps(controlNS).Get(ctx, deploy.ConfigMapName, metav1.GetOptions{}); err == nil && cm.Data["trustDomain"] != "" {
		td = cm.Data["trustDomain"]
	} else if err != nil && !apierrors.IsNotFound(err) {
		return meshedPods{}, fmt.Errorf("read %s/%s: %w", controlNS, deploy.ConfigMapName, err)
	}
	pods, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return meshedPods{}, fmt.Errorf("list pods: %w", err)
	}
	nsList, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return meshedPods{}, fmt.Errorf("list namespaces: %w", err)
	}
	namespaces := map[string]*corev1.Namespace{}
	for i := range nsList.Items {
		namespaces[nsList.Items[i].Name] = &nsList.Items[i]
	}
	pol := policy.Config{ExcludedNamespaces: []string{"kube-system", controlNS}}
	out := meshedPods{pods: map[string]runningPod{}, onNode: map[string][]string{}}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil || p.Spec.NodeName == "" {
			continue
		}
		key := p.Namespace + "/" + p.Name
		sa := p.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		out.pods[key] = runningPod{node: p.Spec.NodeName, id: spiffe.ID{TrustDomain: td, Namespace: p.Namespace, ServiceAccount: sa}.String()}
		if pp, _ := pol.For(p, namespaces[p.Namespace]); pp.Meshed && p.Status.PodIP != "" {
			out.onNode[p.Spec.NodeName] = append(out.onNode[p.Spec.NodeName], key)
		}
	}
	return out, nil
}
