package installcli

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/node/admin"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

// StatusFetcher returns an agent pod's admin status report.
type StatusFetcher func(ctx context.Context, pod *corev1.Pod) (admin.Status, error)

// ProxyStatus fetches an agent's /status through the API server's pod
// proxy (the agent serves it on its node address, admin port).
func ProxyStatus(client kubernetes.Interface) StatusFetcher {
	return func(ctx context.Context, pod *corev1.Pod) (admin.Status, error) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		body, err := client.CoreV1().Pods(pod.Namespace).ProxyGet("http", pod.Name, strconv.Itoa(workload.AdminPort), admin.StatusPath, nil).DoRaw(ctx)
		if err != nil {
			return admin.Status{}, fmt.Errorf("fetch %s: %w", admin.StatusPath, err)
		}
		var st admin.Status
		if err := json.Unmarshal(body, &st); err != nil {
			return admin.Status{}, fmt.Errorf("decode %s: %w", admin.StatusPath, err)
		}
		return st, nil
	}
}

// Check names, for callers and tests.
const (
	CheckAgentsReady = "the node DaemonSet runs a ready agent on every node"
	CheckCNIChained  = "every node's CNI conflist chains tunmesh-cni"
	CheckSameVersion = "agents and control plane run the same version"
	dataPlaneSkipped = "data plane checks skipped: no DaemonSet %s/%s (tunmesh not installed with tunmeshctl install)"
	maxNodesInAHint  = 5
)

// CheckDataPlane checks an installation's data plane: an agent pod of the
// node DaemonSet ready on every node, each node's conflist chaining
// tunmesh-cni (from the agents' /status), and one version across the
// agents (reported and image tag) and tunmesh-identity (image tag), and
// the node guard in force (NodeGuard). It
// returns no checks, and a note, when the DaemonSet does not exist (a
// mesh run by other means, such as the local cluster's processes).
func CheckDataPlane(ctx context.Context, client kubernetes.Interface, ns string, fetch StatusFetcher) (checks []identitycli.Check, note string, err error) {
	ds, err := client.AppsV1().DaemonSets(ns).Get(ctx, deploy.NodeDaemonSetName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Sprintf(dataPlaneSkipped, ns, deploy.NodeDaemonSetName), nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("read DaemonSet %s/%s: %w", ns, deploy.NodeDaemonSetName, err)
	}
	nodes, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, "", fmt.Errorf("list nodes: %w", err)
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil {
		return nil, "", fmt.Errorf("DaemonSet selector: %w", err)
	}
	pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return nil, "", fmt.Errorf("list agent pods: %w", err)
	}
	readyOn := map[string]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.DeletionTimestamp == nil && podReady(p) {
			readyOn[p.Spec.NodeName] = p
		}
	}

	// 1. A ready agent on every node.
	var missing []string
	for _, n := range nodes.Items {
		if readyOn[n.Name] == nil {
			missing = append(missing, n.Name)
		}
	}
	ready := identitycli.Check{Name: fmt.Sprintf("%s (%d of %d nodes)", CheckAgentsReady, len(nodes.Items)-len(missing), len(nodes.Items)), OK: len(missing) == 0 && len(nodes.Items) > 0}
	switch {
	case len(nodes.Items) == 0:
		ready.Hint = "the cluster has no nodes"
	case len(missing) > 0:
		ready.Hint = fmt.Sprintf("no ready agent on %s: see kubectl -n %s get pods -l %s -o wide, and kubectl -n %s describe daemonset %s",
			nodeList(missing), ns, sel, ns, deploy.NodeDaemonSetName)
	case ds.Status.UpdatedNumberScheduled < ds.Status.DesiredNumberScheduled:
		ready.OK = false
		ready.Hint = fmt.Sprintf("rollout in progress: %d of %d agents updated (kubectl -n %s rollout status daemonset %s)",
			ds.Status.UpdatedNumberScheduled, ds.Status.DesiredNumberScheduled, ns, deploy.NodeDaemonSetName)
	}
	checks = append(checks, ready)

	// 2. Each agent's node chains tunmesh-cni; 3. versions.
	var notChained, unreachable []string
	versions := map[string][]string{} // version -> nodes
	names := make([]string, 0, len(readyOn))
	for n := range readyOn {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		st, err := fetch(ctx, readyOn[n])
		if err != nil {
			unreachable = append(unreachable, fmt.Sprintf("%s (%v)", n, err))
			continue
		}
		versions[st.Version] = append(versions[st.Version], n)
		if !st.CNI.Chained {
			why := st.CNI.Error
			if why == "" {
				why = fmt.Sprintf("%s/%s has plugins %v", st.CNI.ConfDir, st.CNI.File, st.CNI.Plugins)
			}
			notChained = append(notChained, fmt.Sprintf("%s: %s", n, why))
		}
	}
	chained := identitycli.Check{Name: CheckCNIChained, OK: len(notChained) == 0 && len(unreachable) == 0 && len(readyOn) > 0}
	var hints []string
	if len(notChained) > 0 {
		hints = append(hints, "not chained on "+strings.Join(notChained, "; ")+
			fmt.Sprintf(" (see kubectl -n %s logs <agent pod> -c cni-install)", ns))
	}
	if len(unreachable) > 0 {
		hints = append(hints, "no status from "+strings.Join(unreachable, "; "))
	}
	if len(readyOn) == 0 {
		hints = append(hints, "no ready agent to ask")
	}
	chained.Hint = strings.Join(hints, "; ")
	checks = append(checks, chained)

	checks = append(checks, versionCheck(ctx, client, ns, versions, pods.Items))
	checks = append(checks, NodeGuard(ctx, client))
	return checks, "", nil
}

// versionCheck compares the agents' reported versions and the image tags
// of every tunmesh container (agents, CNI installers, tunmesh-identity).
func versionCheck(ctx context.Context, client kubernetes.Interface, ns string, versions map[string][]string, agents []corev1.Pod) identitycli.Check {
	c := identitycli.Check{Name: CheckSameVersion, OK: true}
	var hints []string
	if len(versions) > 1 {
		var parts []string
		for v, nodes := range versions {
			parts = append(parts, fmt.Sprintf("%q on %s", v, nodeList(nodes)))
		}
		sort.Strings(parts)
		hints = append(hints, "agents report different versions: "+strings.Join(parts, ", "))
	}
	tags := map[string][]string{} // image tag -> "pod/container"
	add := func(pods []corev1.Pod) {
		for _, p := range pods {
			if p.DeletionTimestamp != nil {
				continue
			}
			for _, ct := range p.Spec.Containers {
				tags[imageTag(ct.Image)] = append(tags[imageTag(ct.Image)], p.Name+"/"+ct.Name)
			}
		}
	}
	add(agents)
	var dep *appsv1.Deployment
	dep, err := client.AppsV1().Deployments(ns).Get(ctx, deploy.IdentityName, metav1.GetOptions{})
	switch {
	case err != nil:
		hints = append(hints, fmt.Sprintf("read Deployment %s/%s: %v", ns, deploy.IdentityName, err))
	default:
		sel, err := metav1.LabelSelectorAsSelector(dep.Spec.Selector)
		if err == nil {
			var idPods *corev1.PodList
			if idPods, err = client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel.String()}); err == nil {
				if len(idPods.Items) == 0 {
					hints = append(hints, "no tunmesh-identity pods")
				}
				add(idPods.Items)
			}
		}
		if err != nil {
			hints = append(hints, fmt.Sprintf("tunmesh-identity pods: %v", err))
		}
	}
	if len(tags) > 1 {
		var parts []string
		for tag, where := range tags {
			parts = append(parts, fmt.Sprintf("%q (%s)", tag, nodeList(where)))
		}
		sort.Strings(parts)
		hints = append(hints, "images with different tags: "+strings.Join(parts, ", ")+
			"; finish the upgrade with tunmeshctl install --tag T | kubectl apply -f -")
	}
	if len(hints) > 0 {
		c.OK, c.Hint = false, strings.Join(hints, "; ")
	} else {
		for tag := range tags {
			c.Name += fmt.Sprintf(" (%s)", tag)
		}
	}
	return c
}

// imageTag returns an image reference's tag (or digest); "latest" when it
// has neither.
func imageTag(ref string) string {
	if _, d, ok := strings.Cut(ref, "@"); ok {
		return d
	}
	name := ref[strings.LastIndexByte(ref, '/')+1:]
	if _, t, ok := strings.Cut(name, ":"); ok {
		return t
	}
	return "latest"
}

func podReady(p *corev1.Pod) bool {
	return slices.ContainsFunc(p.Status.Conditions, func(c corev1.PodCondition) bool {
		return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
	})
}

// nodeList names up to a few items and counts the rest.
func nodeList(items []string) string {
	sort.Strings(items)
	if len(items) <= maxNodesInAHint {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:maxNodesInAHint], ", "), len(items)-maxNodesInAHint)
}
