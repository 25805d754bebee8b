package devcluster

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// Client returns an admin client for a running cluster.
func Client(st *State) (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", st.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", st.Kubeconfig, err)
	}
	c, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("create client: %w", err)
	}
	return c, nil
}

// NodeNetns returns the network namespace of the named node.
func NodeNetns(st *State, node string) (string, error) {
	for _, n := range st.Nodes {
		if n.Name == node {
			return n.Netns, nil
		}
	}
	return "", fmt.Errorf("cluster %q has no node %q", st.Name, node)
}

// ErrRealNodePod means a pod runs on a real node, whose pod network
// namespaces are not named on the host.
var ErrRealNodePod = errors.New("pod on a real node")

// PodNetns returns the network namespace of a running pod.
func PodNetns(ctx context.Context, cfg Config, st *State, namespace, name string) (string, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return "", err
	}
	c, err := Client(st)
	if err != nil {
		return "", err
	}
	pod, err := c.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	if pod.Spec.HostNetwork {
		return NodeNetns(st, pod.Spec.NodeName)
	}
	if st.RealNodes {
		// containerd mounts pod namespaces inside the node's mount
		// namespace; the pod's own tools are one kubectl exec away.
		return "", fmt.Errorf("pod %s/%s runs on a real node: use kubectl exec (dev exec reaches real nodes with --node only): %w", namespace, name, ErrRealNodePod)
	}
	ns := cfg.PodNetnsPrefix() + string(pod.UID)
	if !namedns.Exists(ns) {
		return "", fmt.Errorf("pod %s/%s has no network namespace (phase %s)", namespace, name, pod.Status.Phase)
	}
	return ns, nil
}

// NodeInfo is one line of `dev status`.
type NodeInfo struct {
	NodeState
	Status string
	Pods   int
}

// NodeStatus combines the recorded layout with the API's view of the nodes.
func NodeStatus(ctx context.Context, st *State) ([]NodeInfo, error) {
	c, err := Client(st)
	if err != nil {
		return nil, err
	}
	nodes, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	pods, err := c.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	ready := map[string]string{}
	for _, n := range nodes.Items {
		ready[n.Name] = "NotReady"
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
				ready[n.Name] = "Ready"
			}
		}
	}
	count := map[string]int{}
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning || p.Status.Phase == corev1.PodPending {
			count[p.Spec.NodeName]++
		}
	}
	var out []NodeInfo
	for _, n := range st.Nodes {
		s := ready[n.Name]
		if s == "" {
			s = "Unregistered"
		}
		out = append(out, NodeInfo{NodeState: n, Status: s, Pods: count[n.Name]})
	}
	return out, nil
}
