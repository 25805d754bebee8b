package flowlog

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Workload names a pod's workload: its controller's name, without the
// ReplicaSet's pod-template hash (so a Deployment's pods share one name
// across rollouts) or a CronJob's schedule suffix (so its Jobs share the
// CronJob's name), or the pod's own name when it has no controller.
func Workload(p *corev1.Pod) string {
	for _, o := range p.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		switch o.Kind {
		case "ReplicaSet":
			if h := p.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(o.Name, "-"+h)
			}
		case "Job":
			return cronJobOf(o.Name)
		}
		return o.Name
	}
	return p.Name
}

// cronJobOf is the CronJob a Job's name says it was made by: the CronJob
// controller names its Jobs <cronjob>-<scheduled time in minutes since the
// epoch> (8 digits or more until the year 2160); other names are kept.
func cronJobOf(job string) string {
	i := strings.LastIndexByte(job, '-')
	if i <= 0 || len(job)-i-1 < 8 {
		return job
	}
	for _, r := range job[i+1:] {
		if r < '0' || r > '9' {
			return job
		}
	}
	return job[:i]
}

// Ref is the PodRef of p.
func Ref(p *corev1.Pod) PodRef {
	if p == nil {
		return PodRef{}
	}
	return PodRef{Namespace: p.Namespace, Name: p.Name, Workload: Workload(p)}
}
