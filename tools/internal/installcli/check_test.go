package installcli

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/node/admin"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

const ns = deploy.Namespace

func agentPod(node, tag string, ready bool) *corev1.Pod {
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-node-" + node, Namespace: ns, Labels: map[string]string{"app": "tunmesh-node"}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{
			{Name: "agent", Image: "ghcr.io/tunmesh/tunmesh-node:" + tag},
			{Name: "cni-install", Image: "ghcr.io/tunmesh/tunmesh-cni:" + tag},
		}},
		Status: corev1.PodStatus{Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: st}}},
	}
}

func identityPod(tag string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-identity-x", Namespace: ns, Labels: map[string]string{"app": "tunmesh-identity"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "identity", Image: "ghcr.io/tunmesh/tunmesh-identity:" + tag}}},
	}
}

func daemonSet(desired, updated int32) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: deploy.NodeDaemonSetName, Namespace: ns},
		Spec:       appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "tunmesh-node"}}},
		Status:     appsv1.DaemonSetStatus{DesiredNumberScheduled: desired, UpdatedNumberScheduled: updated},
	}
}

func identityDeployment() *appsv1.Deployment {
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: deploy.IdentityName, Namespace: ns},
		Spec:       appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "tunmesh-identity"}}},
	}
}

func nodeObj(name string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
}

func chainedStatus(version string) admin.Status {
	return admin.Status{Version: version, Ready: true, CNI: admin.CNIReport{ConfDir: "/etc/cni/net.d", File: "10-kindnet.conflist", Plugins: []string{"ptp", "portmap", "tunmesh-cni"}, Chained: true}}
}

func TestCheckDataPlane(t *testing.T) {
	healthy := func() []runtime.Object {
		return []runtime.Object{
			nodeObj("node-1"), nodeObj("node-2"), daemonSet(2, 2), identityDeployment(),
			agentPod("node-1", "v1", true), agentPod("node-2", "v1", true), identityPod("v1"),
		}
	}
	// Every case has the node guard in force (TestCheckNodeGuard tests
	// it); each breaks something else.
	guard := func(objs []runtime.Object) []runtime.Object {
		p, b := shippedGuard(t)
		return append(slices.Clip(objs), p, b)
	}
	statuses := func(m map[string]admin.Status, errs map[string]error) StatusFetcher {
		return func(_ context.Context, p *corev1.Pod) (admin.Status, error) {
			if err := errs[p.Spec.NodeName]; err != nil {
				return admin.Status{}, err
			}
			if st, ok := m[p.Spec.NodeName]; ok {
				return st, nil
			}
			return chainedStatus("v1"), nil
		}
	}
	notChained := admin.Status{Version: "v1", CNI: admin.CNIReport{ConfDir: "/etc/cni/net.d", File: "10-calico.conflist", Plugins: []string{"calico", "portmap"}}}
	for _, tc := range []struct {
		name   string
		objs   []runtime.Object
		status map[string]admin.Status
		errs   map[string]error
		failed map[string]string // check name prefix -> hint substring; others must pass
	}{
		{name: "healthy", objs: healthy()},
		{name: "agent missing on a node", objs: append(healthy(), nodeObj("node-3")),
			failed: map[string]string{CheckAgentsReady: "no ready agent on node-3"}},
		{name: "agent not ready", objs: []runtime.Object{nodeObj("node-1"), nodeObj("node-2"), daemonSet(2, 2), identityDeployment(), agentPod("node-1", "v1", true), agentPod("node-2", "v1", false), identityPod("v1")},
			failed: map[string]string{CheckAgentsReady: "node-2"}},
		{name: "rollout in progress", objs: replace(healthy(), 2, daemonSet(2, 1)),
			failed: map[string]string{CheckAgentsReady: "rollout in progress: 1 of 2"}},
		{name: "conflist not chained", objs: healthy(), status: map[string]admin.Status{"node-2": notChained},
			failed: map[string]string{CheckCNIChained: "node-2: /etc/cni/net.d/10-calico.conflist has plugins [calico portmap]"}},
		{name: "status unreachable", objs: healthy(), errs: map[string]error{"node-1": errors.New("connection refused")},
			failed: map[string]string{CheckCNIChained: "no status from node-1 (connection refused)"}},
		{name: "agents disagree", objs: healthy(), status: map[string]admin.Status{"node-2": chainedStatus("v2")},
			failed: map[string]string{CheckSameVersion: `agents report different versions: "v1" on node-1, "v2" on node-2`}},
		{name: "identity on another tag", objs: replace(healthy(), 6, identityPod("v0")),
			failed: map[string]string{CheckSameVersion: `images with different tags: "v0" (tunmesh-identity-x/identity)`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := fake.NewClientset(guard(tc.objs)...)
			checks, note, err := CheckDataPlane(context.Background(), client, ns, statuses(tc.status, tc.errs))
			if err != nil || note != "" {
				t.Fatalf("err %v, note %q", err, note)
			}
			if len(checks) != 4 {
				t.Fatalf("%d checks: %+v", len(checks), checks)
			}
			for _, c := range checks {
				want, shouldFail := "", false
				for prefix, hint := range tc.failed {
					if strings.HasPrefix(c.Name, prefix) {
						want, shouldFail = hint, true
					}
				}
				switch {
				case shouldFail && (c.OK || !strings.Contains(c.Hint, want)):
					t.Errorf("%q: ok %v, hint %q; want failed with %q", c.Name, c.OK, c.Hint, want)
				case !shouldFail && !c.OK:
					t.Errorf("%q failed: %s", c.Name, c.Hint)
				}
			}
			if tc.name == "healthy" {
				var b strings.Builder
				if !identitycli.PrintChecks(&b, checks) || !strings.Contains(b.String(), "(2 of 2 nodes)") || !strings.Contains(b.String(), "same version (v1)") {
					t.Errorf("healthy output:\n%s", b.String())
				}
			}
		})
	}
}

func TestCheckDataPlaneWithoutDaemonSet(t *testing.T) {
	checks, note, err := CheckDataPlane(context.Background(), fake.NewClientset(nodeObj("n")), ns, nil)
	if err != nil || len(checks) != 0 || !strings.Contains(note, "skipped") {
		t.Errorf("checks %v, note %q, err %v", checks, note, err)
	}
}

func replace(objs []runtime.Object, i int, o runtime.Object) []runtime.Object {
	objs[i] = o
	return objs
}
