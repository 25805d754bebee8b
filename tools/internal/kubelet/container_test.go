package kubelet

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// writeFile creates a small script in dir with the given mode.
func writeFile(t *testing.T, dir, name string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\nexit 0\n"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // WriteFile honours umask
		t.Fatal(err)
	}
	return p
}

func TestResolveCommand(t *testing.T) {
	bin1, bin2, empty := t.TempDir(), t.TempDir(), t.TempDir()
	workload := writeFile(t, bin1, "tunmesh-workload", 0o755)
	shadowSh := writeFile(t, bin1, "sh", 0o755)   // shadows /usr/bin/sh
	writeFile(t, bin1, "notexec", 0o644)          // not executable: skipped
	writeFile(t, bin1, "cat", 0o644)              // not executable: PATH's cat wins
	writeFile(t, bin2, "tunmesh-workload", 0o755) // later dir loses
	only2 := writeFile(t, bin2, "only-in-two", 0o755)
	if err := os.Mkdir(filepath.Join(bin1, "ls"), 0o755); err != nil { // a directory is no command
		t.Fatal(err)
	}

	pathSh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatalf("no sh in PATH: %v", err)
	}
	pathCat, err := exec.LookPath("cat")
	if err != nil {
		t.Fatalf("no cat in PATH: %v", err)
	}
	pathLs, err := exec.LookPath("ls")
	if err != nil {
		t.Fatalf("no ls in PATH: %v", err)
	}

	env := map[string]string{"PORT": "8080", "BIN": bin1, "NAME": "tunmesh-workload", "MODE": "http"}
	expand := func(s string) string { return expandVars(s, env) }
	binDirs := []string{bin1, bin2}

	tests := []struct {
		name     string
		c        corev1.Container
		binDirs  []string
		wantPath string
		wantArgs []string
		wantErr  bool
	}{
		{
			name:     "absolute command with args",
			c:        corev1.Container{Name: "c", Command: []string{"/bin/sh", "-c", "exit 0"}, Args: []string{"x", "y"}},
			wantPath: "/bin/sh", wantArgs: []string{"-c", "exit 0", "x", "y"},
		},
		{
			name:     "bare command found in PATH",
			c:        corev1.Container{Name: "c", Command: []string{"cat"}, Args: []string{"-"}},
			binDirs:  []string{empty},
			wantPath: pathCat, wantArgs: []string{"-"},
		},
		{
			name:     "binDirs searched before PATH",
			c:        corev1.Container{Name: "c", Command: []string{"sh"}, Args: []string{"-c", "true"}},
			wantPath: shadowSh, wantArgs: []string{"-c", "true"},
		},
		{
			name:     "no binDirs falls back to PATH",
			c:        corev1.Container{Name: "c", Command: []string{"sh"}},
			binDirs:  []string{},
			wantPath: pathSh, wantArgs: []string{},
		},
		{
			name:     "non-executable file in binDir skipped",
			c:        corev1.Container{Name: "c", Command: []string{"cat"}},
			wantPath: pathCat, wantArgs: []string{},
		},
		{
			name:     "directory in binDir skipped",
			c:        corev1.Container{Name: "c", Command: []string{"ls"}},
			wantPath: pathLs, wantArgs: []string{},
		},
		{
			name:     "first binDir wins",
			c:        corev1.Container{Name: "c", Command: []string{"tunmesh-workload"}},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:     "later binDir searched",
			c:        corev1.Container{Name: "c", Command: []string{"only-in-two"}},
			wantPath: only2, wantArgs: []string{},
		},
		{
			name:     "image name is the command",
			c:        corev1.Container{Name: "c", Image: "tunmesh-workload", Args: []string{"http"}},
			wantPath: workload, wantArgs: []string{"http"},
		},
		{
			name:     "image tag stripped",
			c:        corev1.Container{Name: "c", Image: "tunmesh-workload:v1.2.3"},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:     "image registry and path stripped",
			c:        corev1.Container{Name: "c", Image: "ghcr.io/tunmesh/tools/tunmesh-workload"},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:     "registry with port, tag and digest stripped",
			c:        corev1.Container{Name: "c", Image: "localhost:5000/tunmesh/tunmesh-workload:dev@sha256:0123456789abcdef"},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:     "digest only stripped",
			c:        corev1.Container{Name: "c", Image: "docker.io/library/tunmesh-workload@sha256:0123456789abcdef"},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:     "command wins over image",
			c:        corev1.Container{Name: "c", Image: "tunmesh-workload", Command: []string{"sh"}},
			wantPath: shadowSh, wantArgs: []string{},
		},
		{
			name:     "vars expanded in command and args",
			c:        corev1.Container{Name: "c", Command: []string{"$(BIN)/tunmesh-workload"}, Args: []string{"$(MODE)", "--port=$(PORT)", "$(UNSET)", "$$(PORT)"}},
			wantPath: workload, wantArgs: []string{"http", "--port=8080", "$(UNSET)", "$(PORT)"},
		},
		{
			name:     "var expanded to bare command name",
			c:        corev1.Container{Name: "c", Command: []string{"$(NAME)"}},
			wantPath: workload, wantArgs: []string{},
		},
		{
			name:    "missing bare command",
			c:       corev1.Container{Name: "c", Command: []string{"tmtest-no-such-command"}},
			wantErr: true,
		},
		{
			name:    "missing image command",
			c:       corev1.Container{Name: "c", Image: "registry.example/tmtest-no-such-image:1"},
			wantErr: true,
		},
		{
			name:    "missing absolute command",
			c:       corev1.Container{Name: "c", Command: []string{filepath.Join(empty, "nothing")}},
			wantErr: true,
		},
		{
			name:    "no command and no image",
			c:       corev1.Container{Name: "c"},
			wantErr: true,
		},
		{
			name:    "image with only a tag",
			c:       corev1.Container{Name: "c", Image: ":latest"},
			wantErr: true,
		},
		{
			name:    "non-executable only",
			c:       corev1.Container{Name: "c", Command: []string{"notexec"}},
			binDirs: []string{bin1},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dirs := binDirs
			if tt.binDirs != nil {
				dirs = tt.binDirs
			}
			cmdBefore := slices.Clone(tt.c.Command)
			argsBefore := slices.Clone(tt.c.Args)
			p, args, err := resolveCommand(tt.c, dirs, expand)
			if tt.wantErr {
				if !errors.Is(err, ErrCommandNotFound) {
					t.Fatalf("resolveCommand() = %q, %q, %v; want ErrCommandNotFound", p, args, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("resolveCommand() error: %v", err)
			}
			if p != tt.wantPath {
				t.Errorf("path = %q, want %q", p, tt.wantPath)
			}
			if !slices.Equal(args, tt.wantArgs) {
				t.Errorf("args = %q, want %q", args, tt.wantArgs)
			}
			if !slices.Equal(tt.c.Command, cmdBefore) || !slices.Equal(tt.c.Args, argsBefore) {
				t.Errorf("spec modified: command %q args %q", tt.c.Command, tt.c.Args)
			}
		})
	}
}

func TestExpandVars(t *testing.T) {
	env := map[string]string{
		"A":        "alpha",
		"B":        "beta",
		"EMPTY":    "",
		"DOLLAR":   "$(A)", // values are not expanded again
		"my.var-1": "dotted",
		"_X":       "under",
	}
	tests := []struct{ in, want string }{
		{"", ""},
		{"plain", "plain"},
		{"$(A)", "alpha"},
		{"x$(A)y", "xalphay"},
		{"$(A)$(B)", "alphabeta"},
		{"$(A)-$(A)", "alpha-alpha"},
		{"$(EMPTY)", ""},
		{"[$(EMPTY)]", "[]"},
		{"$(DOLLAR)", "$(A)"},
		{"$(my.var-1)", "dotted"},
		{"$(_X)", "under"},
		{"$(UNKNOWN)", "$(UNKNOWN)"},
		{"$(UNKNOWN)$(A)", "$(UNKNOWN)alpha"},
		{"$$", "$"},
		{"$$(A)", "$(A)"},
		{"$$$(A)", "$alpha"},
		{"$$$$(A)", "$$(A)"},
		{"$$$$", "$$"},
		{"$", "$"},
		{"$A", "$A"},
		{"${A}", "${A}"},
		{"$(A", "$(A"},
		{"$()", "$()"},
		{"$(1A)", "$(1A)"},
		{"$(A B)", "$(A B)"},
		{"$((A))", "$((A))"},
		{"a$", "a$"},
		{"cost: $$5", "cost: $5"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if got := expandVars(tt.in, env); got != tt.want {
				t.Errorf("expandVars(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
	if got := expandVars("$(A)", nil); got != "$(A)" {
		t.Errorf("expandVars with nil env = %q, want unchanged", got)
	}
}

// Kubernetes (third_party/forked/golang/expansion) reads a reference up to
// the first ")": "$(A$(B))" names the variable "A$(B", which does not exist,
// so the whole string stays as it is. expandVars claims to work "as
// Kubernetes does".
func TestExpandVarsNestedLikeKubernetes(t *testing.T) {
	env := map[string]string{"A": "alpha", "B": "beta"}
	for in, want := range map[string]string{
		"$(A$(B))": "$(A$(B))",
		"$(X$(B)":  "$(X$(B)",
	} {
		if got := expandVars(in, env); got != want {
			t.Fatalf("container.go expandVars(%q) = %q, Kubernetes gives %q (the regexp expands a reference nested inside an unterminated-looking one)", in, got, want)
		}
	}
}

func TestWillRestart(t *testing.T) {
	tests := []struct {
		policy corev1.RestartPolicy
		code   int32
		want   bool
	}{
		{corev1.RestartPolicyAlways, 0, true},
		{corev1.RestartPolicyAlways, 1, true},
		{corev1.RestartPolicyAlways, 137, true},
		{"", 0, true}, // unset means Always
		{"", 2, true},
		{corev1.RestartPolicyOnFailure, 0, false},
		{corev1.RestartPolicyOnFailure, 1, true},
		{corev1.RestartPolicyOnFailure, 143, true},
		{corev1.RestartPolicyOnFailure, -1, true},
		{corev1.RestartPolicyNever, 0, false},
		{corev1.RestartPolicyNever, 1, false},
	}
	for _, tt := range tests {
		if got := willRestart(tt.policy, tt.code); got != tt.want {
			t.Errorf("willRestart(%q, %d) = %v, want %v", tt.policy, tt.code, got, tt.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	tests := []struct {
		n    int32
		want time.Duration
	}{
		{-1, time.Second},
		{0, time.Second},
		{1, time.Second},
		{2, 2 * time.Second},
		{3, 4 * time.Second},
		{4, 8 * time.Second},
		{5, 16 * time.Second},
		{6, 20 * time.Second},
		{7, 20 * time.Second},
		{100, 20 * time.Second},
		{1 << 30, 20 * time.Second},
	}
	for _, tt := range tests {
		if got := backoff(tt.n); got != tt.want {
			t.Errorf("backoff(%d) = %v, want %v", tt.n, got, tt.want)
		}
	}
}

func TestGracePeriod(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	tests := []struct {
		name          string
		deletion, pod *int64
		want          time.Duration
	}{
		{"default", nil, nil, 30 * time.Second},
		{"spec", nil, i64(5), 5 * time.Second},
		{"spec zero", nil, i64(0), 0},
		{"spec negative clamped", nil, i64(-3), 0},
		{"spec capped at 30s", nil, i64(600), 30 * time.Second},
		{"deletion overrides spec", i64(2), i64(10), 2 * time.Second},
		{"deletion zero overrides spec", i64(0), i64(10), 0},
		{"deletion without spec", i64(7), nil, 7 * time.Second},
		{"deletion capped", i64(3600), i64(1), 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &corev1.Pod{}
			p.DeletionGracePeriodSeconds = tt.deletion
			p.Spec.TerminationGracePeriodSeconds = tt.pod
			if got := gracePeriod(p); got != tt.want {
				t.Errorf("gracePeriod() = %v, want %v", got, tt.want)
			}
		})
	}
}

var (
	t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	t1 = t0.Add(time.Minute)
)

// Container fixtures in each state of the container life cycle.

func cWaiting(name string) *container {
	return &container{spec: corev1.Container{Name: name, Image: "img-" + name}}
}

func cInitWaiting(name string) *container {
	return &container{spec: corev1.Container{Name: name, Image: "img-" + name}, isInit: true, reason: "PodInitializing"}
}

func cRunning(name string, ready bool) *container {
	return &container{
		spec: corev1.Container{Name: name, Image: "img-" + name}, proc: &nsproc.Process{},
		started: true, startedAt: t0, ready: ready, id: "42-" + name,
	}
}

func cInitRunning(name string) *container {
	c := cRunning(name, false)
	c.isInit = true
	return c
}

func terminated(code int32) *corev1.ContainerStateTerminated {
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	return &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, StartedAt: metav1.NewTime(t0), FinishedAt: metav1.NewTime(t1),
		ContainerID: "tunmesh-standin://41-x",
	}
}

// cRestarted is running again after restarts earlier exits, the last with code.
func cRestarted(name string, restarts, code int32) *container {
	c := cRunning(name, true)
	c.restarts, c.last = restarts, terminated(code)
	return c
}

// cBackoff exited with code and waits to be restarted.
func cBackoff(name string, code int32) *container {
	return &container{
		spec: corev1.Container{Name: name, Image: "img-" + name}, started: true, startedAt: t0,
		restarts: 2, reason: "CrashLoopBackOff", message: "back-off restarting container " + name,
		last: terminated(code), nextStart: t1, id: "41-" + name,
	}
}

func cFinished(name string, code int32) *container {
	return &container{
		spec: corev1.Container{Name: name, Image: "img-" + name}, started: true, startedAt: t0,
		last: terminated(code), finished: true, id: "41-" + name,
	}
}

func cInitFinished(name string, code int32) *container {
	c := cFinished(name, code)
	c.isInit = true
	return c
}

// oneState checks that exactly one of the state fields is set.
func oneState(t *testing.T, s corev1.ContainerState) {
	t.Helper()
	n := 0
	for _, set := range []bool{s.Waiting != nil, s.Running != nil, s.Terminated != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		t.Errorf("state %+v: %d of waiting/running/terminated set, want exactly 1", s, n)
	}
}

func TestContainerStatusOf(t *testing.T) {
	type want struct {
		waitingReason  string
		waitingMessage string
		running        bool
		exitCode       *int32 // terminated
		lastExit       *int32 // lastTerminationState
		restarts       int32
		ready, started bool
		containerID    string
	}
	code := func(v int32) *int32 { return &v }
	tests := []struct {
		name string
		c    *container
		want want
	}{
		{"never started", cWaiting("a"), want{waitingReason: "ContainerCreating"}},
		{"init waiting", cInitWaiting("i"), want{waitingReason: "PodInitializing"}},
		{"start failed", func() *container {
			c := cWaiting("a")
			c.reason, c.message = "RunContainerError", "container \"a\": not found"
			return c
		}(), want{waitingReason: "RunContainerError", waitingMessage: "container \"a\": not found"}},
		{"running ready", cRunning("a", true), want{running: true, ready: true, started: true, containerID: "tunmesh-standin://42-a"}},
		{"running not ready", cRunning("a", false), want{running: true, started: true, containerID: "tunmesh-standin://42-a"}},
		{"running after restarts", cRestarted("a", 3, 2), want{running: true, ready: true, started: true, restarts: 3, lastExit: code(2), containerID: "tunmesh-standin://42-a"}},
		{"crash loop back-off", cBackoff("a", 1), want{waitingReason: "CrashLoopBackOff", waitingMessage: "back-off restarting container a", lastExit: code(1), restarts: 2, started: true, containerID: "tunmesh-standin://41-a"}},
		{"completed", cFinished("a", 0), want{exitCode: code(0), started: true, containerID: "tunmesh-standin://41-a"}},
		{"failed", cFinished("a", 137), want{exitCode: code(137), started: true, containerID: "tunmesh-standin://41-a"}},
		{"init completed", cInitFinished("i", 0), want{exitCode: code(0), started: true, containerID: "tunmesh-standin://41-i"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := tt.c.statusOf()
			w := tt.want
			oneState(t, st.State)
			if st.Name != tt.c.spec.Name || st.Image != tt.c.spec.Image || st.ImageID != "tunmesh-standin://"+tt.c.spec.Image {
				t.Errorf("name/image/imageID = %q/%q/%q", st.Name, st.Image, st.ImageID)
			}
			if st.ContainerID != w.containerID {
				t.Errorf("containerID = %q, want %q", st.ContainerID, w.containerID)
			}
			if st.RestartCount != w.restarts {
				t.Errorf("restartCount = %d, want %d", st.RestartCount, w.restarts)
			}
			if st.Ready != w.ready {
				t.Errorf("ready = %v, want %v", st.Ready, w.ready)
			}
			if st.Started == nil || *st.Started != w.started {
				t.Errorf("started = %v, want %v", st.Started, w.started)
			}
			switch {
			case w.waitingReason != "":
				if st.State.Waiting == nil || st.State.Waiting.Reason != w.waitingReason || st.State.Waiting.Message != w.waitingMessage {
					t.Errorf("waiting = %+v, want reason %q message %q", st.State.Waiting, w.waitingReason, w.waitingMessage)
				}
			case w.running:
				if st.State.Running == nil || !st.State.Running.StartedAt.Time.Equal(t0) {
					t.Errorf("running = %+v, want startedAt %v", st.State.Running, t0)
				}
			case w.exitCode != nil:
				tm := st.State.Terminated
				if tm == nil || tm.ExitCode != *w.exitCode {
					t.Fatalf("terminated = %+v, want exit code %d", tm, *w.exitCode)
				}
				wantReason := "Completed"
				if *w.exitCode != 0 {
					wantReason = "Error"
				}
				if tm.Reason != wantReason || !tm.FinishedAt.Time.Equal(t1) || !tm.StartedAt.Time.Equal(t0) {
					t.Errorf("terminated = %+v", tm)
				}
			}
			if w.lastExit == nil {
				if st.LastTerminationState.Terminated != nil || st.LastTerminationState.Waiting != nil || st.LastTerminationState.Running != nil {
					t.Errorf("lastTerminationState = %+v, want empty", st.LastTerminationState)
				}
			} else if lt := st.LastTerminationState.Terminated; lt == nil || lt.ExitCode != *w.lastExit {
				t.Errorf("lastTerminationState.terminated = %+v, want exit code %d", lt, *w.lastExit)
			}
		})
	}

	t.Run("no image", func(t *testing.T) {
		c := &container{spec: corev1.Container{Name: "a"}}
		if st := c.statusOf(); st.Image != "none" {
			t.Errorf("image = %q, want none", st.Image)
		}
	})
	t.Run("finished without a recorded exit renders waiting", func(t *testing.T) {
		c := &container{spec: corev1.Container{Name: "a"}, finished: true}
		st := c.statusOf()
		oneState(t, st.State)
		if st.State.Waiting == nil {
			t.Errorf("state = %+v, want waiting", st.State)
		}
	})
}

// A rendered status is a snapshot: pushStatus keeps the last one sent to
// compare with the next, so it must not change when the container does.
func TestContainerStatusOfIsSnapshot(t *testing.T) {
	c := cWaiting("a")
	st := c.statusOf()
	c.started = true
	if *st.Started {
		t.Fatalf("container.go statusOf: Started is &c.started, so a rendered status (and podWorker.sent) changes when the container starts; use ptr.To(c.started)")
	}
}
