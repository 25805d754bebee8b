package kubelet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// container is the local state of one container of a pod. It is owned by the
// pod worker's goroutine.
//
// States: waiting (never started, or backing off before a restart)
// -> running -> terminated (finished for good) or waiting again.
type container struct {
	spec      corev1.Container
	isInit    bool
	proc      *nsproc.Process // nil unless running
	stopProbe context.CancelFunc

	started   bool // has run at least once
	startedAt time.Time
	restarts  int32
	ready     bool
	reason    string // waiting reason when not running
	message   string
	nextStart time.Time                        // earliest restart
	last      *corev1.ContainerStateTerminated // most recent exit
	finished  bool                             // exited and will not restart
	id        string
}

func (c *container) running() bool { return c.proc != nil }

// willRestart applies the pod's restart policy to an exit code.
func willRestart(policy corev1.RestartPolicy, exitCode int32) bool {
	switch policy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return exitCode != 0
	default:
		return true
	}
}

// backoff is the delay before restart number n (1-based): 1s doubling to 20s.
// Shorter than a kubelet's 10s-5m so that tests of crash loops stay quick.
func backoff(n int32) time.Duration {
	d := time.Second
	for i := int32(1); i < n && d < 20*time.Second; i++ {
		d *= 2
	}
	return min(d, 20*time.Second)
}

// ErrCommandNotFound means a container's command could not be resolved.
var ErrCommandNotFound = errors.New("command not found")

// resolveCommand turns a container's command and args into an executable
// path and arguments. Images are not pulled: when command is empty, the
// image's name (last path element, tag and digest stripped) is the command,
// so `image: tunmesh-workload` with `args: [http]` runs that tool. A bare
// name is looked up in binDirs first (tunmesh's own tools) and then in PATH.
func resolveCommand(c corev1.Container, binDirs []string, expand func(string) string) (string, []string, error) {
	argv := append([]string(nil), c.Command...)
	if len(argv) == 0 {
		img := path.Base(c.Image)
		img, _, _ = strings.Cut(img, "@")
		img, _, _ = strings.Cut(img, ":")
		if img == "" || img == "." {
			return "", nil, fmt.Errorf("container %q: no command and no image name: %w", c.Name, ErrCommandNotFound)
		}
		argv = []string{img}
	}
	argv = append(argv, c.Args...)
	for i := range argv {
		argv[i] = expand(argv[i])
	}
	name := argv[0]
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", nil, fmt.Errorf("container %q: %q: %w", c.Name, name, ErrCommandNotFound)
		}
		return name, argv[1:], nil
	}
	for _, dir := range binDirs {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, argv[1:], nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", nil, fmt.Errorf("container %q: %q not in %v nor PATH: %w", c.Name, name, binDirs, ErrCommandNotFound)
	}
	return p, argv[1:], nil
}

// varRef matches $$ and $(...) up to the first ")", as Kubernetes reads a
// reference; names that are not defined stay as they are.
var varRef = regexp.MustCompile(`\$\$|\$\(([^)]*)\)`)

// expandVars replaces $(VAR) with values from env, leaves unknown references
// as they are and turns $$ into $, as Kubernetes does for command and env.
func expandVars(s string, env map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		if v, ok := env[m[2:len(m)-1]]; ok {
			return v
		}
		return m
	})
}

// statusOf renders the container's Kubernetes status.
func (c *container) statusOf() corev1.ContainerStatus {
	st := corev1.ContainerStatus{
		Name:         c.spec.Name,
		Image:        c.spec.Image,
		ImageID:      "tunmesh-standin://" + c.spec.Image,
		RestartCount: c.restarts,
		Ready:        c.ready,
		Started:      ptr.To(c.started),
	}
	if st.Image == "" {
		st.Image = "none"
	}
	if c.id != "" {
		st.ContainerID = "tunmesh-standin://" + c.id
	}
	switch {
	case c.running():
		st.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(c.startedAt)}
		if c.last != nil {
			st.LastTerminationState.Terminated = c.last
		}
	case c.finished && c.last != nil:
		st.State.Terminated = c.last
	default:
		reason := c.reason
		if reason == "" {
			reason = "ContainerCreating"
		}
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: c.message}
		if c.last != nil {
			st.LastTerminationState.Terminated = c.last
		}
	}
	return st
}
