package kubelet

import (
	"errors"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
)

const testNodeIP = "10.250.0.11"

func testWorker(inits, ctrs []*container) *podWorker {
	return &podWorker{
		k:     &Kubelet{cfg: Config{NodeIP: netip.MustParseAddr(testNodeIP)}},
		inits: inits,
		ctrs:  ctrs,
	}
}

func cs(c ...*container) []*container { return c }

func TestPodWorkerPhase(t *testing.T) {
	tests := []struct {
		name  string
		inits []*container
		ctrs  []*container
		want  corev1.PodPhase
	}{
		{"nothing started", nil, cs(cWaiting("a")), corev1.PodPending},
		{"start failed", nil, cs(func() *container { c := cWaiting("a"); c.reason = "RunContainerError"; return c }()), corev1.PodPending},
		{"all running", nil, cs(cRunning("a", true), cRunning("b", false)), corev1.PodRunning},
		{"one of two started", nil, cs(cRunning("a", true), cWaiting("b")), corev1.PodPending},
		{"restarting in back-off", nil, cs(cBackoff("a", 1)), corev1.PodRunning},
		{"running again after restarts", nil, cs(cRestarted("a", 4, 1)), corev1.PodRunning},
		{"one finished ok, one running", nil, cs(cFinished("a", 0), cRunning("b", true)), corev1.PodRunning},
		{"one failed for good, one running", nil, cs(cFinished("a", 1), cRunning("b", true)), corev1.PodRunning},
		{"all completed", nil, cs(cFinished("a", 0), cFinished("b", 0)), corev1.PodSucceeded},
		{"one failed, all finished", nil, cs(cFinished("a", 0), cFinished("b", 2)), corev1.PodFailed},
		{"all failed", nil, cs(cFinished("a", 1), cFinished("b", 137)), corev1.PodFailed},

		{"init waiting", cs(cInitWaiting("i")), cs(cWaiting("a")), corev1.PodPending},
		{"init running", cs(cInitRunning("i")), cs(cWaiting("a")), corev1.PodPending},
		{"init crash-looping", cs(func() *container { c := cBackoff("i", 1); c.isInit = true; return c }()), cs(cWaiting("a")), corev1.PodPending},
		{"init failed for good", cs(cInitFinished("i", 1)), cs(cWaiting("a")), corev1.PodFailed},
		{"second init failed", cs(cInitFinished("i", 0), cInitFinished("j", 3)), cs(cWaiting("a")), corev1.PodFailed},
		{"first init done, second pending", cs(cInitFinished("i", 0), cInitWaiting("j")), cs(cWaiting("a")), corev1.PodPending},
		{"inits done, containers not started", cs(cInitFinished("i", 0), cInitFinished("j", 0)), cs(cWaiting("a")), corev1.PodPending},
		{"inits done, containers running", cs(cInitFinished("i", 0)), cs(cRunning("a", true)), corev1.PodRunning},
		{"inits done, containers completed", cs(cInitFinished("i", 0)), cs(cFinished("a", 0)), corev1.PodSucceeded},
		{"inits done, container failed", cs(cInitFinished("i", 0)), cs(cFinished("a", 1)), corev1.PodFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := testWorker(tt.inits, tt.ctrs).phase(); got != tt.want {
				t.Errorf("phase() = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestPodWorkerStatus(t *testing.T) {
	type conds struct {
		sandbox, initialized, containersReady, ready corev1.ConditionStatus
		initReason, readyReason                      string
	}
	T, F := corev1.ConditionTrue, corev1.ConditionFalse
	podIP := netip.MustParseAddr("10.244.1.5")
	tests := []struct {
		name     string
		w        *podWorker
		phase    corev1.PodPhase
		conds    conds
		podIP    string
		message  string
		started  bool
		initStat int
	}{
		{
			name: "running and ready",
			w: func() *podWorker {
				w := testWorker(cs(cInitFinished("i", 0)), cs(cRunning("a", true), cRestarted("b", 1, 1)))
				w.netns, w.podIP, w.start = "tmpod-1", podIP, t0
				return w
			}(),
			phase:    corev1.PodRunning,
			conds:    conds{T, T, T, T, "", ""},
			podIP:    "10.244.1.5",
			started:  true,
			initStat: 1,
		},
		{
			name: "running, one container not ready",
			w: func() *podWorker {
				w := testWorker(nil, cs(cRunning("a", true), cRunning("b", false)))
				w.netns, w.podIP, w.start = "tmpod-1", podIP, t0
				return w
			}(),
			phase:   corev1.PodRunning,
			conds:   conds{T, T, F, F, "", "ContainersNotReady"},
			podIP:   "10.244.1.5",
			started: true,
		},
		{
			name: "crash loop is not ready",
			w: func() *podWorker {
				w := testWorker(nil, cs(cBackoff("a", 1)))
				w.netns, w.podIP, w.start = "tmpod-1", podIP, t0
				return w
			}(),
			phase:   corev1.PodRunning,
			conds:   conds{T, T, F, F, "", "ContainersNotReady"},
			podIP:   "10.244.1.5",
			started: true,
		},
		{
			name: "pending: init running",
			w: func() *podWorker {
				w := testWorker(cs(cInitRunning("i")), cs(cWaiting("a")))
				w.netns, w.podIP, w.start = "tmpod-1", podIP, t0
				w.ctrs[0].reason = "PodInitializing"
				return w
			}(),
			phase:    corev1.PodPending,
			conds:    conds{T, F, F, F, "ContainersNotInitialized", "ContainersNotReady"},
			podIP:    "10.244.1.5",
			started:  true,
			initStat: 1,
		},
		{
			name: "pending: no sandbox yet",
			w: func() *podWorker {
				w := testWorker(nil, cs(cWaiting("a")))
				w.start = t0
				w.sbErr = errors.New("cni add: plugin exploded")
				return w
			}(),
			phase:   corev1.PodPending,
			conds:   conds{F, T, F, F, "", "ContainersNotReady"},
			message: "cni add: plugin exploded",
			started: true,
		},
		{
			name:  "never synced",
			w:     testWorker(nil, cs(cWaiting("a"))),
			phase: corev1.PodPending,
			conds: conds{F, T, F, F, "", "ContainersNotReady"},
		},
		{
			name: "succeeded and torn down",
			w: func() *podWorker {
				w := testWorker(cs(cInitFinished("i", 0)), cs(cFinished("a", 0)))
				w.podIP, w.start, w.terminal = podIP, t0, true
				return w
			}(),
			phase:    corev1.PodSucceeded,
			conds:    conds{F, T, F, F, "", "PodCompleted"},
			podIP:    "10.244.1.5",
			started:  true,
			initStat: 1,
		},
		{
			name: "failed and torn down",
			w: func() *podWorker {
				w := testWorker(nil, cs(cFinished("a", 0), cFinished("b", 1)))
				w.podIP, w.start, w.terminal = podIP, t0, true
				return w
			}(),
			phase:   corev1.PodFailed,
			conds:   conds{F, T, F, F, "", "ContainersNotReady"},
			podIP:   "10.244.1.5",
			started: true,
		},
		{
			name: "init failed",
			w: func() *podWorker {
				w := testWorker(cs(cInitFinished("i", 0), cInitFinished("j", 1)), cs(cWaiting("a")))
				w.podIP, w.start, w.terminal = podIP, t0, true
				return w
			}(),
			phase:    corev1.PodFailed,
			conds:    conds{F, F, F, F, "ContainersNotInitialized", "ContainersNotReady"},
			podIP:    "10.244.1.5",
			started:  true,
			initStat: 2,
		},
		{
			name: "terminal never ready even with a stale ready flag",
			w: func() *podWorker {
				c := cFinished("a", 0)
				c.ready = true
				w := testWorker(nil, cs(cRunning("b", true), c))
				w.netns, w.podIP, w.start, w.terminal = "tmpod-1", podIP, t0, true
				return w
			}(),
			phase:   corev1.PodRunning,
			conds:   conds{T, T, F, F, "", "ContainersNotReady"},
			podIP:   "10.244.1.5",
			started: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := tt.w.status()
			if st.Phase != tt.phase {
				t.Errorf("phase = %s, want %s", st.Phase, tt.phase)
			}
			if st.HostIP != testNodeIP || len(st.HostIPs) != 1 || st.HostIPs[0].IP != testNodeIP {
				t.Errorf("hostIP = %q, hostIPs = %v, want %s", st.HostIP, st.HostIPs, testNodeIP)
			}
			if st.PodIP != tt.podIP {
				t.Errorf("podIP = %q, want %q", st.PodIP, tt.podIP)
			}
			if tt.podIP == "" && st.PodIPs != nil {
				t.Errorf("podIPs = %v, want none", st.PodIPs)
			}
			if tt.podIP != "" && (len(st.PodIPs) != 1 || st.PodIPs[0].IP != tt.podIP) {
				t.Errorf("podIPs = %v, want [%s]", st.PodIPs, tt.podIP)
			}
			if st.Message != tt.message {
				t.Errorf("message = %q, want %q", st.Message, tt.message)
			}
			if tt.started != (st.StartTime != nil) || (st.StartTime != nil && !st.StartTime.Time.Equal(t0)) {
				t.Errorf("startTime = %v, want set=%v (%v)", st.StartTime, tt.started, t0)
			}
			wantConds := []corev1.PodCondition{
				{Type: corev1.PodReadyToStartContainers, Status: tt.conds.sandbox},
				{Type: corev1.PodInitialized, Status: tt.conds.initialized, Reason: tt.conds.initReason},
				{Type: corev1.ContainersReady, Status: tt.conds.containersReady, Reason: tt.conds.readyReason},
				{Type: corev1.PodReady, Status: tt.conds.ready, Reason: tt.conds.readyReason},
			}
			if !equality.Semantic.DeepEqual(st.Conditions, wantConds) {
				t.Errorf("conditions =\n%+v\nwant\n%+v", st.Conditions, wantConds)
			}
			if len(st.InitContainerStatuses) != tt.initStat || len(st.ContainerStatuses) != len(tt.w.ctrs) {
				t.Fatalf("%d init / %d container statuses, want %d / %d", len(st.InitContainerStatuses), len(st.ContainerStatuses), tt.initStat, len(tt.w.ctrs))
			}
			for i, c := range tt.w.ctrs {
				if !equality.Semantic.DeepEqual(st.ContainerStatuses[i], c.statusOf()) {
					t.Errorf("container status %d = %+v, want %+v", i, st.ContainerStatuses[i], c.statusOf())
				}
			}
			for i, c := range tt.w.inits {
				if st.InitContainerStatuses[i].Name != c.spec.Name {
					t.Errorf("init container status %d is %q, want %q (spec order)", i, st.InitContainerStatuses[i].Name, c.spec.Name)
				}
			}
			// pushStatus skips writes when the rendering is unchanged.
			if again := tt.w.status(); !equality.Semantic.DeepEqual(st, again) {
				t.Errorf("status() not deterministic:\n%+v\n%+v", st, again)
			}
		})
	}
}

// The rendered container states carry the details kubectl shows.
func TestPodWorkerStatusContainerStates(t *testing.T) {
	w := testWorker(cs(cInitFinished("init", 0)), cs(cRunning("web", true), cBackoff("crash", 2), cFinished("job", 3), cWaiting("new")))
	w.netns, w.podIP, w.start = "tmpod-1", netip.MustParseAddr("10.244.1.9"), t0
	st := w.status()
	byName := map[string]corev1.ContainerStatus{}
	for _, s := range append(st.InitContainerStatuses, st.ContainerStatuses...) {
		byName[s.Name] = s
	}
	if s := byName["init"]; s.State.Terminated == nil || s.State.Terminated.ExitCode != 0 || s.State.Terminated.Reason != "Completed" {
		t.Errorf("init: state %+v, want terminated Completed 0", s.State)
	}
	if s := byName["web"]; s.State.Running == nil || !s.Ready || s.RestartCount != 0 {
		t.Errorf("web: %+v, want running and ready", s)
	}
	if s := byName["crash"]; s.State.Waiting == nil || s.State.Waiting.Reason != "CrashLoopBackOff" ||
		s.LastTerminationState.Terminated == nil || s.LastTerminationState.Terminated.ExitCode != 2 || s.RestartCount != 2 || s.Ready {
		t.Errorf("crash: %+v, want waiting CrashLoopBackOff, last exit 2, 2 restarts, not ready", s)
	}
	if s := byName["job"]; s.State.Terminated == nil || s.State.Terminated.ExitCode != 3 || s.State.Terminated.Reason != "Error" {
		t.Errorf("job: state %+v, want terminated Error 3", s.State)
	}
	if s := byName["new"]; s.State.Waiting == nil || s.State.Waiting.Reason != "ContainerCreating" || *s.Started {
		t.Errorf("new: %+v, want waiting ContainerCreating, not started", s)
	}
	if st.Phase != corev1.PodPending {
		t.Errorf("phase = %s, want Pending (container new never started)", st.Phase)
	}
}
