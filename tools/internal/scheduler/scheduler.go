// Package scheduler is the local cluster's scheduler stand-in: it binds each
// unscheduled pod (schedulerName default-scheduler) to a Ready node that
// matches its nodeSelector, required node affinity, required pod
// anti-affinity and taint tolerations, preferring the node with the fewest running pods.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// Name is the schedulerName this stand-in serves.
const Name = corev1.DefaultSchedulerName

// Scheduler binds pods. New starts nothing; Run blocks until ctx ends.
type Scheduler struct {
	client kubernetes.Interface
	log    *slog.Logger
	// assumed records bindings this scheduler made that its informer has
	// not shown yet, so that a burst of pods spreads over the nodes (the
	// real scheduler's "assume" step). Owned by the Run goroutine.
	assumed map[types.UID]string
}

// New checks its dependencies.
func New(client kubernetes.Interface, log *slog.Logger) (*Scheduler, error) {
	if client == nil || log == nil {
		return nil, errors.New("scheduler: nil client or logger")
	}
	return &Scheduler{client: client, log: log.With("component", "scheduler"), assumed: map[types.UID]string{}}, nil
}

// errUnschedulable means no node fits the pod now; it is retried.
var errUnschedulable = errors.New("no node fits")

// Run schedules pods until ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	factory := informers.NewSharedInformerFactory(s.client, 0)
	nodes := factory.Core().V1().Nodes()
	pods := factory.Core().V1().Pods()
	queue := workqueue.NewTypedRateLimitingQueue(workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 10*time.Second))
	defer queue.ShutDown()
	enqueue := func(obj any) {
		if p, ok := obj.(*corev1.Pod); ok && p.Spec.NodeName == "" && p.Spec.SchedulerName == Name && p.DeletionTimestamp == nil {
			if key, err := cache.MetaNamespaceKeyFunc(p); err == nil {
				queue.Add(key)
			}
		}
	}
	if _, err := pods.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	}); err != nil {
		return fmt.Errorf("watch pods: %w", err)
	}
	// A node turning Ready may make waiting pods schedulable.
	requeueAll := func(any) {
		list, _ := pods.Lister().List(labels.Everything())
		for _, p := range list {
			enqueue(p)
		}
	}
	if _, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    requeueAll,
		UpdateFunc: func(_, obj any) { requeueAll(obj) },
	}); err != nil {
		return fmt.Errorf("watch nodes: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nodes.Informer().HasSynced, pods.Informer().HasSynced) {
		return ctx.Err()
	}
	go func() { // RoutineQueueCloser: unblocks Get when ctx ends
		<-ctx.Done()
		queue.ShutDown()
	}()
	for {
		key, quit := queue.Get()
		if quit {
			return nil
		}
		err := s.scheduleKey(ctx, key, pods.Lister(), nodes.Lister())
		switch {
		case err == nil:
			queue.Forget(key)
		case ctx.Err() != nil:
		default:
			if !errors.Is(err, errUnschedulable) {
				s.log.Warn("schedule pod", "pod", key, "err", err)
			}
			queue.AddRateLimited(key)
		}
		queue.Done(key)
	}
}

func (s *Scheduler) scheduleKey(ctx context.Context, key string, pods listersv1.PodLister, nodes listersv1.NodeLister) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	pod, err := pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) || (err == nil && pod.Spec.NodeName != "") {
		return nil
	}
	if err != nil {
		return err
	}
	allNodes, err := nodes.List(labels.Everything())
	if err != nil {
		return err
	}
	allPods, err := pods.List(labels.Everything())
	if err != nil {
		return err
	}
	node, reason := pick(pod, allNodes, s.withAssumed(allPods))
	if node == "" {
		s.markUnschedulable(ctx, pod, reason)
		return errUnschedulable
	}
	binding := &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: node},
	}
	if err := s.client.CoreV1().Pods(pod.Namespace).Bind(ctx, binding, metav1.CreateOptions{}); err != nil {
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			return nil // bound meanwhile or deleted
		}
		return fmt.Errorf("bind pod %s to %s: %w", key, node, err)
	}
	s.assumed[pod.UID] = node
	s.log.Info("pod bound", "pod", pod.Name, "pod_namespace", pod.Namespace, "node", node)
	return nil
}

// withAssumed returns pods with the assumed bindings applied, and forgets
// assumptions the informer has caught up with.
func (s *Scheduler) withAssumed(pods []*corev1.Pod) []*corev1.Pod {
	seen := make(map[types.UID]bool, len(s.assumed))
	out := make([]*corev1.Pod, 0, len(pods))
	for _, p := range pods {
		node, ok := s.assumed[p.UID]
		if !ok {
			out = append(out, p)
			continue
		}
		if p.Spec.NodeName != "" {
			delete(s.assumed, p.UID)
			out = append(out, p)
			continue
		}
		seen[p.UID] = true
		c := p.DeepCopy()
		c.Spec.NodeName = node
		out = append(out, c)
	}
	for uid := range s.assumed {
		if !seen[uid] {
			delete(s.assumed, uid) // deleted, or bound and already forgotten above
		}
	}
	return out
}

func (s *Scheduler) markUnschedulable(ctx context.Context, pod *corev1.Pod, reason string) {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Message == reason {
			return
		}
	}
	p := pod.DeepCopy()
	cond := corev1.PodCondition{
		Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: corev1.PodReasonUnschedulable,
		Message: reason, LastTransitionTime: metav1.Now(),
	}
	replaced := false
	for i := range p.Status.Conditions {
		if p.Status.Conditions[i].Type == corev1.PodScheduled {
			p.Status.Conditions[i], replaced = cond, true
		}
	}
	if !replaced {
		p.Status.Conditions = append(p.Status.Conditions, cond)
	}
	if _, err := s.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
		s.log.Warn("mark pod unschedulable", "pod", p.Name, "pod_namespace", p.Namespace, "err", err)
	}
}

// pick returns the best node for pod, or "" and why none fits.
func pick(pod *corev1.Pod, nodes []*corev1.Node, pods []*corev1.Pod) (string, string) {
	load := map[string]int{}
	for _, p := range pods {
		if p.Spec.NodeName != "" && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			load[p.Spec.NodeName]++
		}
	}
	var fit []string
	reasons := map[string]int{}
	for _, n := range nodes {
		why := fits(pod, n)
		if why == "" && antiAffinityConflict(pod, n, nodes, pods) {
			why = "node(s) didn't match pod anti-affinity rules"
		}
		if why != "" {
			reasons[why]++
			continue
		}
		fit = append(fit, n.Name)
	}
	if len(fit) == 0 {
		// kube-scheduler's wording, which people and tools grep for.
		keys := make([]string, 0, len(reasons))
		for r := range reasons {
			keys = append(keys, r)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, r := range keys {
			parts[i] = fmt.Sprintf("%d %s", reasons[r], r)
		}
		return "", fmt.Sprintf("0/%d nodes are available: %s.", len(nodes), strings.Join(parts, ", "))
	}
	sort.Slice(fit, func(i, j int) bool {
		if load[fit[i]] != load[fit[j]] {
			return load[fit[i]] < load[fit[j]]
		}
		return fit[i] < fit[j]
	})
	return fit[0], ""
}

// fits returns "" when pod may run on node, otherwise a short reason.
func fits(pod *corev1.Pod, node *corev1.Node) string {
	if node.Spec.Unschedulable && !tolerates(pod, &corev1.Taint{Key: corev1.TaintNodeUnschedulable, Effect: corev1.TaintEffectNoSchedule}) {
		return "node(s) were unschedulable"
	}
	ready := false
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready {
		return "node(s) were not ready"
	}
	if !labels.SelectorFromSet(pod.Spec.NodeSelector).Matches(labels.Set(node.Labels)) {
		return "node(s) didn't match Pod's node affinity/selector"
	}
	if !matchesAffinity(pod, node) {
		return "node(s) didn't match Pod's node affinity/selector"
	}
	for _, t := range node.Spec.Taints {
		if t.Effect == corev1.TaintEffectPreferNoSchedule {
			continue
		}
		if !tolerates(pod, &t) {
			return "node(s) had untolerated taint"
		}
	}
	return ""
}

// antiAffinityConflict reports whether placing pod on node breaks a
// required pod anti-affinity term, of pod itself or of a pod already placed
// (the rule is symmetric, as in kube-scheduler). Two nodes share a topology
// domain when both carry the term's topologyKey label with the same value.
func antiAffinityConflict(pod *corev1.Pod, node *corev1.Node, nodes []*corev1.Node, pods []*corev1.Pod) bool {
	labelsOf := map[string]map[string]string{}
	for _, n := range nodes {
		labelsOf[n.Name] = n.Labels
	}
	sameDomain := func(key, other string) bool {
		v, ok := node.Labels[key]
		w, ok2 := labelsOf[other][key]
		return ok && ok2 && v == w
	}
	violates := func(owner *corev1.Pod, terms []corev1.PodAffinityTerm, target *corev1.Pod) bool {
		for _, term := range terms {
			sel, err := metav1.LabelSelectorAsSelector(term.LabelSelector)
			if err != nil || term.LabelSelector == nil || !sel.Matches(labels.Set(target.Labels)) {
				continue
			}
			nss := term.Namespaces
			if len(nss) == 0 {
				nss = []string{owner.Namespace}
			}
			for _, ns := range nss {
				if ns == target.Namespace {
					return true
				}
			}
		}
		return false
	}
	required := func(p *corev1.Pod) []corev1.PodAffinityTerm {
		if p.Spec.Affinity == nil || p.Spec.Affinity.PodAntiAffinity == nil {
			return nil
		}
		return p.Spec.Affinity.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution
	}
	for _, other := range pods {
		if other.UID == pod.UID || other.Spec.NodeName == "" || other.Status.Phase == corev1.PodSucceeded || other.Status.Phase == corev1.PodFailed {
			continue
		}
		for _, term := range required(pod) {
			if sameDomain(term.TopologyKey, other.Spec.NodeName) && violates(pod, []corev1.PodAffinityTerm{term}, other) {
				return true
			}
		}
		for _, term := range required(other) {
			if sameDomain(term.TopologyKey, other.Spec.NodeName) && violates(other, []corev1.PodAffinityTerm{term}, pod) {
				return true
			}
		}
	}
	return false
}

func tolerates(pod *corev1.Pod, t *corev1.Taint) bool {
	for _, tol := range pod.Spec.Tolerations {
		if tol.ToleratesTaint(klog.Background(), t, false) {
			return true
		}
	}
	return false
}

func matchesAffinity(pod *corev1.Pod, node *corev1.Node) bool {
	a := pod.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return true
	}
	// Terms are ORed; the expressions of one term are ANDed.
	for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		if termMatches(term, node) {
			return true
		}
	}
	return false
}

func termMatches(term corev1.NodeSelectorTerm, node *corev1.Node) bool {
	if len(term.MatchExpressions) == 0 && len(term.MatchFields) == 0 {
		return false
	}
	for _, e := range term.MatchExpressions {
		op := map[corev1.NodeSelectorOperator]selection.Operator{
			corev1.NodeSelectorOpIn: selection.In, corev1.NodeSelectorOpNotIn: selection.NotIn,
			corev1.NodeSelectorOpExists: selection.Exists, corev1.NodeSelectorOpDoesNotExist: selection.DoesNotExist,
			corev1.NodeSelectorOpGt: selection.GreaterThan, corev1.NodeSelectorOpLt: selection.LessThan,
		}[e.Operator]
		req, err := labels.NewRequirement(e.Key, op, e.Values)
		if err != nil || !req.Matches(labels.Set(node.Labels)) {
			return false
		}
	}
	for _, f := range term.MatchFields {
		if f.Key != "metadata.name" {
			return false
		}
		in := false
		for _, v := range f.Values {
			in = in || v == node.Name
		}
		if (f.Operator == corev1.NodeSelectorOpIn) != in {
			return false
		}
	}
	return true
}
