package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/podnet"
)

// cniAgent serves the CNI plugin.
type cniAgent struct{ a *Agent }

func (c *cniAgent) podnetConfig(gateways []netip.Addr) podnet.Config {
	return podnet.Config{TUN: "tm0", MTU: c.a.cfg.TUNMTU, Cluster: c.a.cfg.Cluster, Bypass: gateways}
}

// Add decides on the pod and, when meshed, sets up tm0, routes and the
// NIC, and asks for the pod's certificate.
func (c *cniAgent) Add(ctx context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error) {
	a := c.a
	if p := a.local.container(req.ContainerID); p != nil { // a repeated ADD
		return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: p.netns}}, nil
	}
	pod, err := a.client.CoreV1().Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
	if err != nil {
		code := cniapi.CodeTryAgainLater
		if apierrors.IsNotFound(err) {
			code = cniapi.CodeGeneric
		}
		return cniapi.AddResponse{}, cniapi.Errorf(code, "get pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	ns, _ := a.client.CoreV1().Namespaces().Get(ctx, req.PodNamespace, metav1.GetOptions{})
	pol, perrs := a.policy.For(pod, ns)
	for _, e := range perrs {
		a.recorder.Eventf(pod, corev1.EventTypeWarning, "InvalidMeshAnnotation", "%v", e)
		a.log.Warn("invalid mesh annotation", "pod", pod.Name, "pod_namespace", pod.Namespace, "err", e)
	}
	if !pol.Meshed {
		a.log.Info("pod not meshed", "pod", pod.Name, "pod_namespace", pod.Namespace, "reason", pol.Reason)
		return cniapi.AddResponse{Meshed: false, Reason: pol.Reason}, nil
	}
	var addrs []netip.Addr
	for _, p := range req.IPs {
		addrs = append(addrs, p.Addr())
	}
	if len(addrs) == 0 {
		return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s: no IPs from the primary plugin", req.PodNamespace, req.PodName)
	}
	// The node's side of the pod network (the first address of each
	// prefix: the bridge gateway) stays on eth0: probes come from it.
	var gws []netip.Addr
	for _, p := range req.IPs {
		gws = append(gws, p.Masked().Addr().Next())
	}
	fd, err := podnet.Setup(req.Netns, c.podnetConfig(gws))
	if err != nil {
		return cniapi.AddResponse{}, fmt.Errorf("set up pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	nic, err := a.stack.AttachTUN(netstack.NICConfig{FD: fd, Addrs: addrs, MTU: a.cfg.TUNMTU, Name: req.PodNamespace + "/" + req.PodName})
	if err != nil {
		closeFD(fd)
		_ = podnet.Teardown(req.Netns, c.podnetConfig(gws))
		return cniapi.AddResponse{}, fmt.Errorf("attach pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	lp := &localPod{
		containerID: req.ContainerID, namespace: pod.Namespace, name: pod.Name, netns: req.Netns,
		addrs: addrs, nic: nic, id: a.identity(pod.Namespace, serviceAccount(pod)), policy: pol,
	}
	if err := a.saveState(lp); err != nil {
		_ = a.stack.DetachNIC(nic)
		_ = podnet.Teardown(req.Netns, c.podnetConfig(gws))
		return cniapi.AddResponse{}, fmt.Errorf("record pod %s/%s: %w", req.PodNamespace, req.PodName, err)
	}
	a.local.add(lp)
	a.certs.Acquire(lp.id)
	a.metrics.pods.Inc()
	a.log.Info("pod meshed", "pod", pod.Name, "pod_namespace", pod.Namespace, "identity", lp.id.String(), "nic", nic)
	return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: req.Netns}}, nil
}

// Del releases the pod. Everything already gone is fine.
func (c *cniAgent) Del(ctx context.Context, req cniapi.DelRequest) error {
	a := c.a
	p := a.local.remove(req.ContainerID)
	if p == nil {
		a.dropState(req.ContainerID) // recorded by a run that died before re-attaching
		return nil
	}
	a.dropState(req.ContainerID)
	if err := a.stack.DetachNIC(p.nic); err != nil && !errors.Is(err, netstack.ErrUnknownNIC) {
		a.log.Warn("detach pod", "pod", p.name, "pod_namespace", p.namespace, "err", err)
	}
	a.certs.Release(p.id)
	a.metrics.pods.Dec()
	netns := req.Netns
	if netns == "" {
		netns = p.netns
	}
	if err := podnet.Teardown(netns, c.podnetConfig(nil)); err != nil {
		return fmt.Errorf("tear down pod %s/%s: %w", p.namespace, p.name, err)
	}
	a.log.Info("pod released", "pod", p.name, "pod_namespace", p.namespace)
	return nil
}

// Check reports an error when a pod that should be meshed is not attached.
func (c *cniAgent) Check(ctx context.Context, req cniapi.CheckRequest) error {
	if p := c.a.local.container(req.ContainerID); p != nil {
		// Compare what the agent recorded with the live namespace.
		if err := podnet.Check(req.Netns, c.podnetConfig(nil)); err != nil {
			return cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
		}
		return nil
	}
	pod, err := c.a.client.CoreV1().Pods(req.PodNamespace).Get(ctx, req.PodName, metav1.GetOptions{})
	if err != nil {
		return cniapi.Errorf(cniapi.CodeTryAgainLater, "get pod %s/%s: %v", req.PodNamespace, req.PodName, err)
	}
	ns, _ := c.a.client.CoreV1().Namespaces().Get(ctx, req.PodNamespace, metav1.GetOptions{})
	if pol, _ := c.a.policy.For(pod, ns); pol.Meshed {
		return cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s should be meshed but is not attached to the agent", req.PodNamespace, req.PodName)
	}
	return nil
}

// Status: ready once the informers have synced.
func (c *cniAgent) Status(context.Context) cniapi.StatusResponse {
	if !c.a.cluster.synced() || !c.a.resolver.Synced() {
		return cniapi.StatusResponse{Ready: false, Message: "agent informers not synced"}
	}
	return cniapi.StatusResponse{Ready: true}
}

// GC releases pods the runtime no longer knows.
func (c *cniAgent) GC(ctx context.Context, req cniapi.GCRequest) error {
	valid := map[string]bool{}
	for _, att := range req.ValidAttachments {
		valid[att.ContainerID] = true
	}
	c.a.local.mu.RLock()
	var stale []string
	for id := range c.a.local.byContainer {
		if !valid[id] {
			stale = append(stale, id)
		}
	}
	c.a.local.mu.RUnlock()
	for _, id := range stale {
		if err := c.Del(ctx, cniapi.DelRequest{ContainerID: id}); err != nil {
			return err
		}
	}
	return nil
}
