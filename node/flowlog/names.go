package flowlog

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Workload names a pod's workload: its controller's name, without the
// ReplicaSet's pod-template hash (so a Deployment's pods share one name
// across rollouts), or the pod's own name when it has no controller.
func Workload(p *corev1.Pod) string {
	for _, o := range p.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		if o.Kind == "ReplicaSet" {
			if h := p.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(o.Name, "-"+h)
			}
		}
		return o.Name
	}
	return p.Name
}

// Ref is the PodRef of p.
func Ref(p *corev1.Pod) PodRef {
	if p == nil {
		return PodRef{}
	}
	return PodRef{Namespace: p.Namespace, Name: p.Name, Workload: Workload(p)}
}
