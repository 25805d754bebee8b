package clusterview

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Every agent caches every pod of the cluster, so a cached pod's size is
// multiplied by the cluster's pod count on every node. The informers
// therefore keep only what the agent reads (slimPod, slimNamespace): a
// decoded pod as the API server sends it carries managedFields, container
// specs, volumes and conditions, several KiB the agent never looks at.
//
// A field that is not copied here reads as its zero value from the view:
// code that starts reading another pod field must add it to slimPod (and
// to TestSlimPodKeepsWhatTheAgentReads).

// lastApplied is kubectl's copy of the whole object in an annotation; the
// mesh's own annotations are short and stay.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// slimMeta keeps the object metadata the agent reads or the informer
// needs (ResourceVersion for the watch, UID for identity).
func slimMeta(m *metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name:              m.Name,
		Namespace:         m.Namespace,
		UID:               m.UID,
		ResourceVersion:   m.ResourceVersion,
		Labels:            m.Labels,
		Annotations:       withoutLastApplied(m.Annotations),
		OwnerReferences:   m.OwnerReferences,
		DeletionTimestamp: m.DeletionTimestamp,
	}
}

func withoutLastApplied(a map[string]string) map[string]string {
	if _, ok := a[lastApplied]; !ok {
		return a
	}
	out := make(map[string]string, len(a)-1)
	for k, v := range a {
		if k != lastApplied {
			out[k] = v
		}
	}
	return out
}

// slimPod is the part of a pod the agent reads: identity (namespace,
// ServiceAccount), placement (node, host IPs, hostNetwork), addresses,
// phase and deletion, annotations (the mesh's per-pod settings), labels
// and container ports (NetworkPolicy and authorization).
func slimPod(p *corev1.Pod) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   p.TypeMeta,
		ObjectMeta: slimMeta(&p.ObjectMeta),
		Spec: corev1.PodSpec{
			NodeName:           p.Spec.NodeName,
			ServiceAccountName: p.Spec.ServiceAccountName,
			HostNetwork:        p.Spec.HostNetwork,
			InitContainers:     slimContainers(p.Spec.InitContainers),
			Containers:         slimContainers(p.Spec.Containers),
		},
		Status: corev1.PodStatus{
			Phase:   p.Status.Phase,
			HostIP:  p.Status.HostIP,
			HostIPs: p.Status.HostIPs,
			PodIP:   p.Status.PodIP,
			PodIPs:  p.Status.PodIPs,
		},
	}
}

// slimContainers keeps the containers' ports (NetworkPolicy and
// Authorization named ports), names, and their probes' ports (the node's
// kubelet is let through to those only: authz.ProbePort), nothing else;
// nil when no container declares a port or a probe.
func slimContainers(cs []corev1.Container) []corev1.Container {
	var out []corev1.Container
	for i, c := range cs {
		lp, rp, sp := slimProbe(c.LivenessProbe), slimProbe(c.ReadinessProbe), slimProbe(c.StartupProbe)
		if len(c.Ports) == 0 && lp == nil && rp == nil && sp == nil {
			continue
		}
		if out == nil {
			out = make([]corev1.Container, 0, len(cs)-i)
		}
		out = append(out, corev1.Container{Name: c.Name, Ports: c.Ports, LivenessProbe: lp, ReadinessProbe: rp, StartupProbe: sp})
	}
	return out
}

// slimProbe keeps the port of a network probe (TCP, HTTP, gRPC); nil for
// none or an exec probe.
func slimProbe(p *corev1.Probe) *corev1.Probe {
	switch {
	case p == nil:
		return nil
	case p.TCPSocket != nil:
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: p.TCPSocket.Port}}}
	case p.HTTPGet != nil:
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: p.HTTPGet.Port}}}
	case p.GRPC != nil:
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: p.GRPC.Port}}}
	}
	return nil
}

// slimNamespace keeps a namespace's metadata (its annotations carry the
// mesh's namespace-wide settings) and drops spec, status and managedFields.
func slimNamespace(ns *corev1.Namespace) *corev1.Namespace {
	return &corev1.Namespace{TypeMeta: ns.TypeMeta, ObjectMeta: slimMeta(&ns.ObjectMeta)}
}

// slim is the informers' cache.TransformFunc. It also sees the tombstones
// of deletions (cache.DeletedFinalStateUnknown) and anything else
// unexpected: those pass unchanged.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return slimPod(o), nil
	case *corev1.Namespace:
		return slimNamespace(o), nil
	}
	return obj, nil
}
