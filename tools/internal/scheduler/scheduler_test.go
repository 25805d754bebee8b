package scheduler

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// node builds a Ready node; opts adjust it.
func node(name string, opts ...func(*corev1.Node)) *corev1.Node {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}},
		Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{
			{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse},
			{Type: corev1.NodeReady, Status: corev1.ConditionTrue},
		}},
	}
	for _, o := range opts {
		o(n)
	}
	return n
}

func notReady(n *corev1.Node) {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == corev1.NodeReady {
			n.Status.Conditions[i].Status = corev1.ConditionFalse
		}
	}
}

func unknownReady(n *corev1.Node) {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == corev1.NodeReady {
			n.Status.Conditions[i].Status = corev1.ConditionUnknown
		}
	}
}

func noConditions(n *corev1.Node) { n.Status.Conditions = nil }

func cordoned(n *corev1.Node) { n.Spec.Unschedulable = true }

func withLabels(kv ...string) func(*corev1.Node) {
	return func(n *corev1.Node) {
		for i := 0; i < len(kv); i += 2 {
			n.Labels[kv[i]] = kv[i+1]
		}
	}
}

func tainted(key, value string, effect corev1.TaintEffect) func(*corev1.Node) {
	return func(n *corev1.Node) {
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: key, Value: value, Effect: effect})
	}
}

// pod builds an unscheduled pod; opts adjust it.
func pod(name string, opts ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: corev1.PodSpec{
			SchedulerName: Name,
			Containers:    []corev1.Container{{Name: "c", Image: "busybox"}},
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func selector(kv ...string) func(*corev1.Pod) {
	return func(p *corev1.Pod) {
		p.Spec.NodeSelector = map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			p.Spec.NodeSelector[kv[i]] = kv[i+1]
		}
	}
}

// affinity sets required node affinity with the given (ORed) terms.
func affinity(terms ...corev1.NodeSelectorTerm) func(*corev1.Pod) {
	return func(p *corev1.Pod) {
		p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
			RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: terms},
		}}
	}
}

func expr(key string, op corev1.NodeSelectorOperator, values ...string) corev1.NodeSelectorRequirement {
	return corev1.NodeSelectorRequirement{Key: key, Operator: op, Values: values}
}

func exprs(rs ...corev1.NodeSelectorRequirement) corev1.NodeSelectorTerm {
	return corev1.NodeSelectorTerm{MatchExpressions: rs}
}

func fieldsTerm(rs ...corev1.NodeSelectorRequirement) corev1.NodeSelectorTerm {
	return corev1.NodeSelectorTerm{MatchFields: rs}
}

func tolerate(t corev1.Toleration) func(*corev1.Pod) {
	return func(p *corev1.Pod) { p.Spec.Tolerations = append(p.Spec.Tolerations, t) }
}

// podLabels sets the pod's labels.
func podLabels(kv ...string) func(*corev1.Pod) {
	return func(p *corev1.Pod) {
		p.Labels = map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

// antiAffinity adds a required pod anti-affinity term against pods labelled
// app=<app> over topologyKey.
func antiAffinity(app, topologyKey string) func(*corev1.Pod) {
	return func(p *corev1.Pod) {
		if p.Spec.Affinity == nil {
			p.Spec.Affinity = &corev1.Affinity{}
		}
		if p.Spec.Affinity.PodAntiAffinity == nil {
			p.Spec.Affinity.PodAntiAffinity = &corev1.PodAntiAffinity{}
		}
		a := p.Spec.Affinity.PodAntiAffinity
		a.RequiredDuringSchedulingIgnoredDuringExecution = append(a.RequiredDuringSchedulingIgnoredDuringExecution, corev1.PodAffinityTerm{
			LabelSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": app}},
			TopologyKey:   topologyKey,
		})
	}
}

// placed is on() with pod options.
func placed(name, nodeName string, opts ...func(*corev1.Pod)) *corev1.Pod {
	p := pod(name, func(p *corev1.Pod) {
		p.Spec.NodeName = nodeName
		p.Status.Phase = corev1.PodRunning
	})
	for _, o := range opts {
		o(p)
	}
	return p
}

// on builds a pod bound to nodeName in the given phase (load for pick).
func on(name, nodeName string, phase corev1.PodPhase) *corev1.Pod {
	p := pod(name)
	p.Spec.NodeName = nodeName
	p.Status.Phase = phase
	return p
}

const (
	whyUnschedulable = "node(s) were unschedulable"
	whyNotReady      = "node(s) were not ready"
	whySelector      = "node(s) didn't match Pod's node affinity/selector"
	whyTaint         = "node(s) had untolerated taint"
)

func TestFits(t *testing.T) {
	tests := []struct {
		name string
		pod  *corev1.Pod
		node *corev1.Node
		want string
	}{
		{"ready node, plain pod", pod("p"), node("n"), ""},
		{"not ready", pod("p"), node("n", notReady), whyNotReady},
		{"ready unknown", pod("p"), node("n", unknownReady), whyNotReady},
		{"no conditions at all", pod("p"), node("n", noConditions), whyNotReady},
		{"unschedulable", pod("p"), node("n", cordoned), whyUnschedulable},
		{"unschedulable wins over not ready", pod("p"), node("n", cordoned, notReady), whyUnschedulable},

		{"nodeSelector matches", pod("p", selector("disk", "ssd")), node("n", withLabels("disk", "ssd")), ""},
		{"nodeSelector value differs", pod("p", selector("disk", "ssd")), node("n", withLabels("disk", "hdd")), whySelector},
		{"nodeSelector label missing", pod("p", selector("disk", "ssd")), node("n"), whySelector},
		{"nodeSelector all labels required", pod("p", selector("disk", "ssd", "zone", "a")), node("n", withLabels("disk", "ssd")), whySelector},
		{"empty nodeSelector matches", pod("p", selector()), node("n"), ""},

		{"affinity In matches", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpIn, "a", "b")))), node("n", withLabels("zone", "b")), ""},
		{"affinity In no match", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpIn, "a", "b")))), node("n", withLabels("zone", "c")), whySelector},
		{"affinity In label missing", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpIn, "a")))), node("n"), whySelector},
		{"affinity NotIn matches", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpNotIn, "a")))), node("n", withLabels("zone", "b")), ""},
		{"affinity NotIn matches missing label", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpNotIn, "a")))), node("n"), ""},
		{"affinity NotIn excluded", pod("p", affinity(exprs(expr("zone", corev1.NodeSelectorOpNotIn, "a")))), node("n", withLabels("zone", "a")), whySelector},
		{"affinity Exists", pod("p", affinity(exprs(expr("gpu", corev1.NodeSelectorOpExists)))), node("n", withLabels("gpu", "")), ""},
		{"affinity Exists missing", pod("p", affinity(exprs(expr("gpu", corev1.NodeSelectorOpExists)))), node("n"), whySelector},
		{"affinity DoesNotExist", pod("p", affinity(exprs(expr("gpu", corev1.NodeSelectorOpDoesNotExist)))), node("n"), ""},
		{"affinity DoesNotExist present", pod("p", affinity(exprs(expr("gpu", corev1.NodeSelectorOpDoesNotExist)))), node("n", withLabels("gpu", "1")), whySelector},
		{"affinity Gt", pod("p", affinity(exprs(expr("cores", corev1.NodeSelectorOpGt, "4")))), node("n", withLabels("cores", "8")), ""},
		{"affinity Gt fails", pod("p", affinity(exprs(expr("cores", corev1.NodeSelectorOpGt, "4")))), node("n", withLabels("cores", "2")), whySelector},
		{"affinity Lt", pod("p", affinity(exprs(expr("cores", corev1.NodeSelectorOpLt, "4")))), node("n", withLabels("cores", "2")), ""},
		{"affinity unknown operator never matches", pod("p", affinity(exprs(expr("zone", "Like", "a")))), node("n", withLabels("zone", "a")), whySelector},
		{"affinity expressions ANDed", pod("p", affinity(exprs(
			expr("zone", corev1.NodeSelectorOpIn, "a"),
			expr("gpu", corev1.NodeSelectorOpExists),
		))), node("n", withLabels("zone", "a")), whySelector},
		{"affinity expressions ANDed all hold", pod("p", affinity(exprs(
			expr("zone", corev1.NodeSelectorOpIn, "a"),
			expr("gpu", corev1.NodeSelectorOpExists),
		))), node("n", withLabels("zone", "a", "gpu", "1")), ""},
		{"affinity terms ORed", pod("p", affinity(
			exprs(expr("zone", corev1.NodeSelectorOpIn, "x")),
			exprs(expr("zone", corev1.NodeSelectorOpIn, "a")),
		)), node("n", withLabels("zone", "a")), ""},
		{"affinity empty term matches nothing", pod("p", affinity(corev1.NodeSelectorTerm{})), node("n"), whySelector},
		{"affinity no terms matches nothing", pod("p", affinity()), node("n"), whySelector},
		{"affinity without required part", pod("p", func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{}}
		}), node("n"), ""},
		{"selector and affinity both needed", pod("p", selector("disk", "ssd"), affinity(exprs(expr("zone", corev1.NodeSelectorOpIn, "a")))),
			node("n", withLabels("zone", "a")), whySelector},

		{"matchFields name In", pod("p", affinity(fieldsTerm(expr("metadata.name", corev1.NodeSelectorOpIn, "other", "n")))), node("n"), ""},
		{"matchFields name In other node", pod("p", affinity(fieldsTerm(expr("metadata.name", corev1.NodeSelectorOpIn, "other")))), node("n"), whySelector},
		{"matchFields name NotIn", pod("p", affinity(fieldsTerm(expr("metadata.name", corev1.NodeSelectorOpNotIn, "other")))), node("n"), ""},
		{"matchFields name NotIn self", pod("p", affinity(fieldsTerm(expr("metadata.name", corev1.NodeSelectorOpNotIn, "n")))), node("n"), whySelector},
		{"matchFields unsupported key", pod("p", affinity(fieldsTerm(expr("metadata.uid", corev1.NodeSelectorOpIn, "n")))), node("n"), whySelector},
		{"matchFields and expressions ANDed", pod("p", affinity(corev1.NodeSelectorTerm{
			MatchExpressions: []corev1.NodeSelectorRequirement{expr("zone", corev1.NodeSelectorOpIn, "a")},
			MatchFields:      []corev1.NodeSelectorRequirement{expr("metadata.name", corev1.NodeSelectorOpIn, "n")},
		})), node("n", withLabels("zone", "b")), whySelector},

		{"NoSchedule taint untolerated", pod("p"), node("n", tainted("dedicated", "db", corev1.TaintEffectNoSchedule)), whyTaint},
		{"NoExecute taint untolerated", pod("p"), node("n", tainted("dedicated", "db", corev1.TaintEffectNoExecute)), whyTaint},
		{"PreferNoSchedule taint ignored", pod("p"), node("n", tainted("dedicated", "db", corev1.TaintEffectPreferNoSchedule)), ""},
		{"NoSchedule tolerated by Equal", pod("p", tolerate(corev1.Toleration{
			Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "db", Effect: corev1.TaintEffectNoSchedule,
		})), node("n", tainted("dedicated", "db", corev1.TaintEffectNoSchedule)), ""},
		{"NoSchedule tolerated by Exists", pod("p", tolerate(corev1.Toleration{
			Key: "dedicated", Operator: corev1.TolerationOpExists,
		})), node("n", tainted("dedicated", "db", corev1.TaintEffectNoSchedule)), ""},
		{"tolerate everything", pod("p", tolerate(corev1.Toleration{Operator: corev1.TolerationOpExists})),
			node("n", tainted("a", "1", corev1.TaintEffectNoSchedule), tainted("b", "2", corev1.TaintEffectNoExecute)), ""},
		{"toleration value differs", pod("p", tolerate(corev1.Toleration{
			Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "web", Effect: corev1.TaintEffectNoSchedule,
		})), node("n", tainted("dedicated", "db", corev1.TaintEffectNoSchedule)), whyTaint},
		{"toleration effect differs", pod("p", tolerate(corev1.Toleration{
			Key: "dedicated", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute,
		})), node("n", tainted("dedicated", "db", corev1.TaintEffectNoSchedule)), whyTaint},
		{"one of two taints untolerated", pod("p", tolerate(corev1.Toleration{
			Key: "a", Operator: corev1.TolerationOpExists,
		})), node("n", tainted("a", "1", corev1.TaintEffectNoSchedule), tainted("b", "2", corev1.TaintEffectNoSchedule)), whyTaint},
		{"control-plane taint", pod("p"), node("n", tainted("node-role.kubernetes.io/control-plane", "", corev1.TaintEffectNoSchedule)), whyTaint},
		{"control-plane taint tolerated", pod("p", tolerate(corev1.Toleration{
			Key: "node-role.kubernetes.io/control-plane", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule,
		})), node("n", tainted("node-role.kubernetes.io/control-plane", "", corev1.TaintEffectNoSchedule)), ""},
		{"selector checked before taints", pod("p", selector("disk", "ssd")), node("n", tainted("a", "1", corev1.TaintEffectNoSchedule)), whySelector},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := fits(tt.pod, tt.node); got != tt.want {
				t.Errorf("fits() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestPick(t *testing.T) {
	tests := []struct {
		name     string
		pod      *corev1.Pod
		nodes    []*corev1.Node
		pods     []*corev1.Pod
		wantNode string
		// wantReasons are the "<count> <reason>" parts of the message, in order.
		wantReasons []string
	}{
		{
			name:     "single ready node",
			pod:      pod("p"),
			nodes:    []*corev1.Node{node("a")},
			wantNode: "a",
		},
		{
			name:     "tie broken by name",
			pod:      pod("p"),
			nodes:    []*corev1.Node{node("c"), node("a"), node("b")},
			wantNode: "a",
		},
		{
			name:  "least loaded node chosen",
			pod:   pod("p"),
			nodes: []*corev1.Node{node("a"), node("b"), node("c")},
			pods: []*corev1.Pod{
				on("x1", "a", corev1.PodRunning), on("x2", "a", corev1.PodRunning),
				on("x3", "b", corev1.PodPending),
				on("x4", "c", corev1.PodRunning), on("x5", "c", corev1.PodRunning),
			},
			wantNode: "b",
		},
		{
			name:  "load tie broken by name",
			pod:   pod("p"),
			nodes: []*corev1.Node{node("b"), node("a")},
			pods: []*corev1.Pod{
				on("x1", "a", corev1.PodRunning), on("x2", "b", corev1.PodRunning),
			},
			wantNode: "a",
		},
		{
			name:  "terminal pods not counted",
			pod:   pod("p"),
			nodes: []*corev1.Node{node("a"), node("b")},
			pods: []*corev1.Pod{
				on("x1", "a", corev1.PodSucceeded), on("x2", "a", corev1.PodFailed), on("x3", "a", corev1.PodSucceeded),
				on("x4", "b", corev1.PodRunning),
			},
			wantNode: "a",
		},
		{
			name:  "unscheduled pods not counted",
			pod:   pod("p"),
			nodes: []*corev1.Node{node("a"), node("b")},
			pods: []*corev1.Pod{
				pod("pending1"), pod("pending2"),
				on("x1", "a", corev1.PodRunning),
			},
			wantNode: "b",
		},
		{
			name:  "load on non-fitting node irrelevant",
			pod:   pod("p"),
			nodes: []*corev1.Node{node("a", notReady), node("b"), node("c")},
			pods: []*corev1.Pod{
				on("x1", "b", corev1.PodRunning), on("x2", "c", corev1.PodRunning), on("x3", "c", corev1.PodRunning),
			},
			wantNode: "b",
		},
		{
			name:     "only ready node chosen despite load",
			pod:      pod("p"),
			nodes:    []*corev1.Node{node("a", notReady), node("b", cordoned), node("c")},
			pods:     []*corev1.Pod{on("x1", "c", corev1.PodRunning), on("x2", "c", corev1.PodRunning)},
			wantNode: "c",
		},
		{
			name:     "nodeSelector restricts choice",
			pod:      pod("p", selector("disk", "ssd")),
			nodes:    []*corev1.Node{node("a"), node("b", withLabels("disk", "ssd"))},
			wantNode: "b",
		},
		{
			name:     "matchFields pins to a node",
			pod:      pod("p", affinity(fieldsTerm(expr("metadata.name", corev1.NodeSelectorOpIn, "c")))),
			nodes:    []*corev1.Node{node("a"), node("b"), node("c")},
			wantNode: "c",
		},
		{
			name:     "tainted node avoided",
			pod:      pod("p"),
			nodes:    []*corev1.Node{node("a", tainted("k", "v", corev1.TaintEffectNoSchedule)), node("b")},
			pods:     []*corev1.Pod{on("x1", "b", corev1.PodRunning)},
			wantNode: "b",
		},
		{
			name:  "pod anti-affinity beats load",
			pod:   pod("p", podLabels("app", "echo"), antiAffinity("echo", "kubernetes.io/hostname")),
			nodes: []*corev1.Node{node("a"), node("b")},
			pods: []*corev1.Pod{
				placed("e1", "a", podLabels("app", "echo")),
				on("x1", "b", corev1.PodRunning), on("x2", "b", corev1.PodRunning),
			},
			wantNode: "b",
		},
		{
			name:  "pod anti-affinity of a placed pod is symmetric",
			pod:   pod("p", podLabels("app", "echo")),
			nodes: []*corev1.Node{node("a"), node("b")},
			pods: []*corev1.Pod{
				placed("e1", "a", podLabels("app", "echo"), antiAffinity("echo", "kubernetes.io/hostname")),
				on("x1", "b", corev1.PodRunning), on("x2", "b", corev1.PodRunning),
			},
			wantNode: "b",
		},
		{
			name:  "pod anti-affinity ignores other namespaces and finished pods",
			pod:   pod("p", podLabels("app", "echo"), antiAffinity("echo", "kubernetes.io/hostname")),
			nodes: []*corev1.Node{node("a"), node("b")},
			pods: []*corev1.Pod{
				placed("e1", "a", podLabels("app", "echo"), func(p *corev1.Pod) { p.Namespace = "other" }),
				placed("e2", "a", podLabels("app", "echo"), func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }),
				on("x1", "b", corev1.PodRunning),
			},
			wantNode: "a",
		},
		{
			name:  "pod anti-affinity over a zone label",
			pod:   pod("p", podLabels("app", "echo"), antiAffinity("echo", "zone")),
			nodes: []*corev1.Node{node("a", withLabels("zone", "z1")), node("b", withLabels("zone", "z1")), node("c", withLabels("zone", "z2"))},
			pods: []*corev1.Pod{
				placed("e1", "a", podLabels("app", "echo")),
				on("x1", "c", corev1.PodRunning), on("x2", "c", corev1.PodRunning),
			},
			wantNode: "c",
		},
		{
			name:        "pod anti-affinity leaves no node",
			pod:         pod("p", podLabels("app", "echo"), antiAffinity("echo", "kubernetes.io/hostname")),
			nodes:       []*corev1.Node{node("a"), node("b")},
			pods:        []*corev1.Pod{placed("e1", "a", podLabels("app", "echo")), placed("e2", "b", podLabels("app", "echo"))},
			wantReasons: []string{"2 node(s) didn't match pod anti-affinity rules"},
		},
		{
			name:        "no nodes",
			pod:         pod("p"),
			wantReasons: nil,
		},
		{
			name:        "single not ready",
			pod:         pod("p"),
			nodes:       []*corev1.Node{node("a", notReady)},
			wantReasons: []string{"1 " + whyNotReady},
		},
		{
			name: "mixed reasons counted and sorted",
			pod:  pod("p", selector("disk", "ssd")),
			nodes: []*corev1.Node{
				node("a", notReady), node("b", cordoned), node("c", notReady),
				node("d", withLabels("disk", "ssd"), tainted("k", "v", corev1.TaintEffectNoSchedule)),
				node("e"),
			},
			wantReasons: []string{"1 " + whySelector, "1 " + whyTaint, "2 " + whyNotReady, "1 " + whyUnschedulable},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, msg := pick(tt.pod, tt.nodes, tt.pods)
			if got != tt.wantNode {
				t.Fatalf("pick() node = %q (msg %q), want %q", got, msg, tt.wantNode)
			}
			if tt.wantNode != "" {
				if msg != "" {
					t.Errorf("pick() chose %q but also returned message %q", got, msg)
				}
				return
			}
			prefix := fmt.Sprintf("0/%d nodes are available", len(tt.nodes))
			if !strings.HasPrefix(msg, prefix) {
				t.Fatalf("message %q does not start with %q", msg, prefix)
			}
			// The separator after the prefix is checked by
			// TestPickMessageMatchesKubeScheduler; here only the reasons.
			rest := strings.TrimLeft(strings.TrimPrefix(msg, prefix), ":, ")
			rest = strings.TrimSuffix(rest, ".")
			var reasons []string
			if rest != "" {
				reasons = strings.Split(rest, ", ")
			}
			if strings.Join(reasons, "|") != strings.Join(tt.wantReasons, "|") {
				t.Errorf("message %q: reasons %q, want %q", msg, reasons, tt.wantReasons)
			}
		})
	}
}

// kube-scheduler reports "0/N nodes are available: <n> <reason>, <n> <reason>."
// (a colon after the count, reasons joined by ", "). Tools and people grep for
// that form.
func TestPickMessageMatchesKubeScheduler(t *testing.T) {
	nodes := []*corev1.Node{node("a", notReady), node("b", cordoned), node("c", cordoned)}
	_, msg := pick(pod("p"), nodes, nil)
	want := "0/3 nodes are available: 1 node(s) were not ready, 2 node(s) were unschedulable"
	if msg != want && msg != want+"." {
		t.Fatalf("scheduler.go pick: unschedulable message is %q, want %q (kube-scheduler format: colon after the count, not a comma)", msg, want+".")
	}
}

func TestNew(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	client := fake.NewClientset()
	if _, err := New(nil, log); err == nil {
		t.Error("New(nil client) succeeded")
	}
	if _, err := New(client, nil); err == nil {
		t.Error("New(nil logger) succeeded")
	}
	if s, err := New(client, log); err != nil || s == nil {
		t.Errorf("New() = %v, %v", s, err)
	}
}

// TestRunBindsPods runs the scheduler against a fake clientset: the pending
// pod goes to the less loaded Ready node, a pod no node fits is marked
// Unschedulable, pods of another scheduler are left alone, and Run returns
// once the context ends.
func TestRunBindsPods(t *testing.T) {
	objs := []runtime.Object{
		node("node-a"), node("node-b"), node("node-c", notReady),
		on("busy", "node-a", corev1.PodRunning),
		on("done1", "node-b", corev1.PodSucceeded), on("done2", "node-b", corev1.PodFailed),
		pod("web"),
		pod("picky", selector("disk", "ssd")),
		pod("foreign", func(p *corev1.Pod) { p.Spec.SchedulerName = "other-scheduler" }),
	}
	client := newBindingClient(t, 0, objs...)

	s, err := New(client, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-runErr:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})

	getPod := func(name string) *corev1.Pod {
		p, err := client.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get pod %s: %v", name, err)
		}
		return p
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		web := getPod("web")
		picky := getPod("picky")
		var cond *corev1.PodCondition
		for i, c := range picky.Status.Conditions {
			if c.Type == corev1.PodScheduled {
				cond = &picky.Status.Conditions[i]
			}
		}
		if web.Spec.NodeName != "" && cond != nil {
			if web.Spec.NodeName != "node-b" {
				t.Errorf("web bound to %q, want node-b (node-a has a running pod, node-c is not ready)", web.Spec.NodeName)
			}
			if cond.Status != corev1.ConditionFalse || cond.Reason != corev1.PodReasonUnschedulable {
				t.Errorf("picky PodScheduled = %s/%s, want False/%s", cond.Status, cond.Reason, corev1.PodReasonUnschedulable)
			}
			for _, part := range []string{"0/3 nodes are available", "2 " + whySelector, "1 " + whyNotReady} {
				if !strings.Contains(cond.Message, part) {
					t.Errorf("picky PodScheduled message %q lacks %q", cond.Message, part)
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out: web nodeName %q, picky conditions %+v", web.Spec.NodeName, picky.Status.Conditions)
		}
		time.Sleep(20 * time.Millisecond)
	}

	cancel()
	select {
	case err := <-runErr:
		if err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
		runErr <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}

	var bindings []*corev1.Binding
	for _, a := range client.Actions() {
		if a.GetVerb() == "create" && a.GetResource().Resource == "pods" && a.GetSubresource() == "binding" {
			b := a.(k8stesting.CreateAction).GetObject().(*corev1.Binding)
			bindings = append(bindings, b)
		}
	}
	if len(bindings) == 0 {
		t.Fatal("no create pods/binding action recorded")
	}
	for _, b := range bindings {
		if b.Name != "web" || b.Namespace != "default" {
			t.Errorf("unexpected binding of %s/%s (only web may be bound)", b.Namespace, b.Name)
		}
		if b.Target.Name != "node-b" || b.Target.Kind != "Node" {
			t.Errorf("binding target = %s %q, want Node node-b", b.Target.Kind, b.Target.Name)
		}
		if b.UID != getPod("web").UID {
			t.Errorf("binding UID = %q, want the pod's", b.UID)
		}
	}
	if n := getPod("foreign").Spec.NodeName; n != "" {
		t.Errorf("pod of another scheduler bound to %q", n)
	}
	if n := getPod("picky").Spec.NodeName; n != "" {
		t.Errorf("unschedulable pod bound to %q", n)
	}
}

// newBindingClient is a fake clientset that acts like the apiserver on
// pods/binding: it sets spec.nodeName, and binding a bound pod is a
// conflict. The new nodeName is stored (and so seen by informers) after
// delay, to mimic a slow watch.
func newBindingClient(t *testing.T, delay time.Duration, objs ...runtime.Object) *fake.Clientset {
	client := fake.NewClientset(objs...)
	podsGVR := corev1.SchemeGroupVersion.WithResource("pods")
	var (
		mu    sync.Mutex
		bound = map[string]string{}
		wg    sync.WaitGroup
	)
	t.Cleanup(wg.Wait)
	client.PrependReactor("create", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		ca, ok := a.(k8stesting.CreateAction)
		if !ok || ca.GetSubresource() != "binding" {
			return false, nil, nil
		}
		b := ca.GetObject().(*corev1.Binding)
		key := a.GetNamespace() + "/" + b.Name
		obj, err := client.Tracker().Get(podsGVR, a.GetNamespace(), b.Name)
		if err != nil {
			return true, nil, err
		}
		p := obj.(*corev1.Pod).DeepCopy()
		mu.Lock()
		defer mu.Unlock()
		if n := bound[key]; n != "" || p.Spec.NodeName != "" {
			return true, nil, apierrors.NewConflict(podsGVR.GroupResource(), p.Name, fmt.Errorf("already bound to %s%s", n, p.Spec.NodeName))
		}
		bound[key] = b.Target.Name
		p.Spec.NodeName = b.Target.Name
		if delay == 0 {
			return true, b, client.Tracker().Update(podsGVR, p, a.GetNamespace())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(delay)
			if err := client.Tracker().Update(podsGVR, p, p.Namespace); err != nil {
				t.Errorf("delayed binding of %s: %v", key, err)
			}
		}()
		return true, b, nil
	})
	return client
}

func TestWithAssumed(t *testing.T) {
	unbound := pod("unbound")
	caught := on("caught", "node-b", corev1.PodRunning)
	other := on("other", "node-a", corev1.PodRunning)
	s := &Scheduler{assumed: map[types.UID]string{
		unbound.UID: "node-a", // bound by us, informer not caught up
		caught.UID:  "node-b", // informer caught up
		"gone-uid":  "node-a", // pod deleted meanwhile
	}}
	in := []*corev1.Pod{unbound, caught, other}
	out := s.withAssumed(in)
	if len(out) != 3 {
		t.Fatalf("withAssumed returned %d pods, want 3", len(out))
	}
	if out[0].Spec.NodeName != "node-a" || out[0].UID != unbound.UID {
		t.Errorf("assumed pod = %s on %q, want on node-a", out[0].Name, out[0].Spec.NodeName)
	}
	if unbound.Spec.NodeName != "" {
		t.Error("withAssumed modified the lister's pod (must copy)")
	}
	if out[1] != caught || out[2] != other {
		t.Error("pods without a pending assumption must be passed through unchanged")
	}
	if len(s.assumed) != 1 || s.assumed[unbound.UID] != "node-a" {
		t.Errorf("assumed after = %v, want only the unbound pod's", s.assumed)
	}
	// The assumption counts as load.
	if node, _ := pick(pod("next"), []*corev1.Node{node("node-a"), node("node-b")}, s.withAssumed([]*corev1.Pod{unbound})); node != "node-b" {
		t.Errorf("pick with node-a assumed busy = %q, want node-b", node)
	}
	// Once the pod is gone from the lister, the assumption goes too.
	if out := s.withAssumed(nil); len(out) != 0 || len(s.assumed) != 0 {
		t.Errorf("withAssumed(nil) = %v, assumed %v; want both empty", out, s.assumed)
	}
}

// A burst of pods created together spreads over the nodes even before the
// informer has shown the first bindings.
func TestRunSpreadsBurst(t *testing.T) {
	objs := []runtime.Object{node("node-a"), node("node-b")}
	for i := range 6 {
		objs = append(objs, pod(fmt.Sprintf("burst-%d", i)))
	}
	// The informer shows each binding only after 300ms: without the
	// scheduler's own bookkeeping every pod would go to node-a.
	client := newBindingClient(t, 300*time.Millisecond, objs...)
	s, err := New(client, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case <-runErr:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := client.CoreV1().Pods("default").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		perNode := map[string]int{}
		for _, p := range list.Items {
			perNode[p.Spec.NodeName]++
		}
		if perNode[""] == 0 {
			if perNode["node-a"] != 3 || perNode["node-b"] != 3 {
				t.Errorf("pods per node = %v, want 3 and 3", perNode)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pods per node = %v after 10s", perNode)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kube-scheduler's NodeUnschedulable filter lets a pod that tolerates the
// node.kubernetes.io/unschedulable:NoSchedule taint onto a cordoned node
// (DaemonSet pods get that toleration automatically).
func TestFitsCordonedNodeTolerated(t *testing.T) {
	p := pod("ds-pod", tolerate(corev1.Toleration{
		Key: corev1.TaintNodeUnschedulable, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule,
	}))
	if why := fits(p, node("n", cordoned)); why != "" {
		t.Fatalf("scheduler.go fits: cordoned node rejected (%q) although the pod tolerates %s:NoSchedule", why, corev1.TaintNodeUnschedulable)
	}
}
