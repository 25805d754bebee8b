package kubelet

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// phase derives the pod phase from the local container states.
func (w *podWorker) phase() corev1.PodPhase {
	for _, c := range w.inits {
		if c.finished && c.last != nil && c.last.ExitCode != 0 {
			return corev1.PodFailed
		}
		if !(c.finished && c.last != nil && c.last.ExitCode == 0) {
			return corev1.PodPending
		}
	}
	allFinished, allStarted, failed := true, true, false
	for _, c := range w.ctrs {
		allFinished = allFinished && c.finished
		allStarted = allStarted && c.started
		failed = failed || (c.finished && c.last != nil && c.last.ExitCode != 0)
	}
	switch {
	case allFinished && failed:
		return corev1.PodFailed
	case allFinished:
		return corev1.PodSucceeded
	case allStarted:
		return corev1.PodRunning
	default:
		return corev1.PodPending
	}
}

// status renders the pod status the kubelet owns. Times are taken from
// recorded transitions so that an unchanged pod renders an equal status.
func (w *podWorker) status() *corev1.PodStatus {
	st := &corev1.PodStatus{Phase: w.phase()}
	if !w.start.IsZero() {
		t := metav1.NewTime(w.start)
		st.StartTime = &t
	}
	st.HostIP = w.k.cfg.NodeIP.String()
	st.HostIPs = []corev1.HostIP{{IP: st.HostIP}}
	if w.podIP.IsValid() {
		st.PodIP = w.podIP.String()
		st.PodIPs = []corev1.PodIP{{IP: st.PodIP}}
	}
	initialized, ready := true, st.Phase == corev1.PodRunning
	for _, c := range w.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.statusOf())
		initialized = initialized && c.finished && c.last != nil && c.last.ExitCode == 0
	}
	for _, c := range w.ctrs {
		st.ContainerStatuses = append(st.ContainerStatuses, c.statusOf())
		ready = ready && c.ready
	}
	cond := func(t corev1.PodConditionType, ok bool, reason string) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
			reason = ""
		}
		return corev1.PodCondition{Type: t, Status: s, Reason: reason}
	}
	sandboxReady := w.netns != ""
	if w.sbErr != nil {
		st.Message = w.sbErr.Error()
	}
	if w.terminal {
		ready = false
	}
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, sandboxReady, ""),
		cond(corev1.PodInitialized, initialized, "ContainersNotInitialized"),
		cond(corev1.ContainersReady, ready, "ContainersNotReady"),
		cond(corev1.PodReady, ready, "ContainersNotReady"),
	}
	if w.terminal && st.Phase == corev1.PodSucceeded {
		st.Conditions[2].Reason, st.Conditions[3].Reason = "PodCompleted", "PodCompleted"
	}
	return st
}

// pushStatus writes the status when it changed since the last write,
// keeping fields the kubelet does not own (PodScheduled, qosClass) and the
// transition times of conditions that did not change.
func (w *podWorker) pushStatus(ctx context.Context) {
	st := w.status()
	if w.sent != nil && equality.Semantic.DeepEqual(st, w.sent) {
		return
	}
	pods := w.k.client.CoreV1().Pods(w.pod.Namespace)
	for attempt := 0; attempt < 3; attempt++ {
		cur, err := pods.Get(ctx, w.pod.Name, metav1.GetOptions{})
		if err != nil {
			if !apierrors.IsNotFound(err) {
				w.log.Warn("get pod for status", "err", err)
				w.retryPush = time.Now().Add(time.Second)
			}
			return
		}
		if cur.UID != w.pod.UID {
			return
		}
		next := st.DeepCopy()
		next.QOSClass = cur.Status.QOSClass
		now := metav1.Now()
		for i := range next.Conditions {
			c := &next.Conditions[i]
			c.LastTransitionTime = now
			for _, old := range cur.Status.Conditions {
				if old.Type == c.Type && old.Status == c.Status {
					c.LastTransitionTime = old.LastTransitionTime
				}
			}
		}
		for _, old := range cur.Status.Conditions {
			if old.Type == corev1.PodScheduled || old.Type == corev1.DisruptionTarget {
				next.Conditions = append(next.Conditions, old)
			}
		}
		cur.Status = *next
		_, err = pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		if err == nil {
			w.sent, w.retryPush = st, time.Time{}
			return
		}
		if !apierrors.IsConflict(err) {
			if ctx.Err() == nil {
				w.log.Warn("update pod status", "err", err)
			}
			break
		}
	}
	w.retryPush = time.Now().Add(time.Second)
}
