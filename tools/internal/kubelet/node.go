package kubelet

import (
	"context"
	"fmt"
	"runtime"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

const leaseNamespace = "kube-node-lease"

// register creates (or updates) the Node object with its pod CIDR and a
// Ready status, retrying until the API server answers or ctx ends.
func (k *Kubelet) register(ctx context.Context) error {
	for {
		err := k.registerOnce(ctx)
		if err == nil {
			return nil
		}
		k.log.Warn("register node", "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("register node %s: %w", k.cfg.NodeName, err)
		case <-time.After(time.Second):
		}
	}
}

func (k *Kubelet) registerOnce(ctx context.Context) error {
	cidr := k.cfg.PodCIDR.String()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.cfg.NodeName,
			Labels: map[string]string{
				corev1.LabelHostname:   k.cfg.NodeName,
				corev1.LabelOSStable:   "linux",
				corev1.LabelArchStable: runtime.GOARCH,
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
	}
	if _, err := k.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create node: %w", err)
	}
	return k.renew(ctx)
}

func (k *Kubelet) heartbeat(ctx context.Context) {
	t := time.NewTicker(k.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := k.renew(ctx); err != nil && ctx.Err() == nil {
				k.log.Warn("node heartbeat", "err", err)
			}
		}
	}
}

// renew refreshes the node's status (Ready, addresses, capacity) and its
// Lease, as a kubelet's status and lease loops do.
func (k *Kubelet) renew(ctx context.Context) error {
	node, err := k.client.CoreV1().Nodes().Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node: %w", err)
	}
	now := metav1.Now()
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: k.cfg.NodeIP.String()},
		{Type: corev1.NodeHostName, Address: k.cfg.NodeName},
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse(fmt.Sprint(runtime.NumCPU())),
		corev1.ResourceMemory: resource.MustParse("8Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	node.Status.Capacity = capacity
	node.Status.Allocatable = capacity
	node.Status.NodeInfo = corev1.NodeSystemInfo{
		KubeletVersion:          k.cfg.Version,
		OperatingSystem:         "linux",
		Architecture:            runtime.GOARCH,
		ContainerRuntimeVersion: "tunmesh-standin://" + k.cfg.Version,
	}
	setNodeCondition(node, corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kubelet stand-in is posting ready status", now)
	for _, c := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure} {
		setNodeCondition(node, c, corev1.ConditionFalse, "KubeletHasSufficient"+string(c)[:len(c)-len("Pressure")], "", now)
	}
	if _, err := k.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update node status: %w", err)
	}
	return k.renewLease(ctx, node)
}

func setNodeCondition(node *corev1.Node, typ corev1.NodeConditionType, status corev1.ConditionStatus, reason, msg string, now metav1.Time) {
	for i := range node.Status.Conditions {
		c := &node.Status.Conditions[i]
		if c.Type != typ {
			continue
		}
		if c.Status != status {
			c.LastTransitionTime = now
		}
		c.Status, c.Reason, c.Message, c.LastHeartbeatTime = status, reason, msg, now
		return
	}
	node.Status.Conditions = append(node.Status.Conditions, corev1.NodeCondition{
		Type: typ, Status: status, Reason: reason, Message: msg,
		LastHeartbeatTime: now, LastTransitionTime: now,
	})
}

func (k *Kubelet) renewLease(ctx context.Context, node *corev1.Node) error {
	leases := k.client.CoordinationV1().Leases(leaseNamespace)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      k.cfg.NodeName,
				Namespace: leaseNamespace,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(k.cfg.NodeName),
				LeaseDurationSeconds: ptr.To(int32(40)),
				RenewTime:            &now,
			},
		}
		if _, err := leases.Create(ctx, lease, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create lease: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get lease: %w", err)
	}
	lease.Spec.RenewTime = &now
	if _, err := leases.Update(ctx, lease, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("renew lease: %w", err)
	}
	return nil
}
