package kubelet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/utils/ptr"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// podWorker realizes one pod. Its run goroutine owns every field below the
// mutex; observe() hands it new views of the pod through update().
//
// Pod life: pending (sandbox, init containers) -> running -> terminal
// (sandbox torn down, status kept) ; deletion at any point stops the
// containers, tears the sandbox down and removes the object.
type podWorker struct {
	k   *Kubelet
	log *slog.Logger

	mu      sync.Mutex // guards latest and gone
	latest  *corev1.Pod
	gone    bool          // the object left the API
	notify  chan struct{} // a new view is waiting; capacity 1
	events  chan func()   // container exits and probe results, run on the worker goroutine
	done    chan struct{} // closed when run returns
	pod     *corev1.Pod
	dir     string
	netns   string // set once the sandbox exists
	hostNet bool   // netns is the node's (hostNetwork pod)
	podIP   netip.Addr
	sbErr   error
	sbRetry time.Time
	sbTries int32
	start   time.Time
	inits   []*container
	ctrs    []*container
	// terminal: every container finished; the sandbox is gone.
	terminal bool
	// sent is the last status written to the API; nil forces a write.
	sent      *corev1.PodStatus
	retryPush time.Time
}

func newPodWorker(k *Kubelet, pod *corev1.Pod) *podWorker {
	w := &podWorker{
		k:      k,
		log:    k.log.With("pod", pod.Name, "pod_namespace", pod.Namespace),
		latest: pod, // run may start before the first update()
		notify: make(chan struct{}, 1),
		events: make(chan func(), 64),
		done:   make(chan struct{}),
		dir:    filepath.Join(k.cfg.StateDir, "pods", pod.Namespace+"_"+pod.Name+"_"+string(pod.UID)),
	}
	for _, c := range pod.Spec.InitContainers {
		w.inits = append(w.inits, &container{spec: c, isInit: true, reason: "PodInitializing"})
	}
	for _, c := range pod.Spec.Containers {
		w.ctrs = append(w.ctrs, &container{spec: c})
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		// Finished before this kubelet saw it (for example before a restart
		// of the cluster supervisor): nothing to run, keep its status.
		w.terminal = true
		w.sent = pod.Status.DeepCopy()
	}
	return w
}

func (w *podWorker) update(pod *corev1.Pod, gone bool) {
	w.mu.Lock()
	w.latest, w.gone = pod, gone
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *podWorker) snapshot() (*corev1.Pod, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.latest, w.gone
}

// post queues fn to run on the worker goroutine; dropped once run returned.
func (w *podWorker) post(fn func()) {
	select {
	case w.events <- fn:
	case <-w.done:
	}
}

func (w *podWorker) run(ctx context.Context) {
	defer close(w.done)
	// Whatever ends the worker, nothing of the pod stays on the node.
	defer w.stopAndTeardown(5 * time.Second)
	deleted := false
	for {
		pod, gone := w.snapshot()
		w.pod = pod
		switch {
		case gone:
			return
		case pod.DeletionTimestamp != nil && !deleted:
			w.stopAndTeardown(gracePeriod(pod))
			w.finalDelete(ctx)
			deleted = true
		case pod.DeletionTimestamp == nil:
			if !w.terminal {
				w.sync(ctx)
			}
			w.pushStatus(ctx)
		}
		wake := time.Hour
		if at := w.nextWake(); !at.IsZero() {
			wake = time.Until(at)
		}
		t := time.NewTimer(wake)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-w.notify:
		case fn := <-w.events:
			fn()
		case <-t.C:
		}
		t.Stop()
	}
}

func gracePeriod(pod *corev1.Pod) time.Duration {
	g := int64(30)
	if pod.DeletionGracePeriodSeconds != nil {
		g = *pod.DeletionGracePeriodSeconds
	} else if pod.Spec.TerminationGracePeriodSeconds != nil {
		g = *pod.Spec.TerminationGracePeriodSeconds
	}
	return time.Duration(min(max(g, 0), 30)) * time.Second
}

// nextWake is the earliest time the worker has something to do on its own.
func (w *podWorker) nextWake() time.Time {
	var at time.Time
	earliest := func(t time.Time) {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	if w.netns == "" && !w.terminal {
		earliest(w.sbRetry)
	}
	for _, c := range append(w.inits[:len(w.inits):len(w.inits)], w.ctrs...) {
		if !c.running() && !c.finished {
			earliest(c.nextStart)
		}
	}
	earliest(w.retryPush)
	return at
}

// sync brings the node in line with the pod: sandbox, then init containers
// one by one, then the containers, restarting per policy.
func (w *podWorker) sync(ctx context.Context) {
	now := time.Now()
	if w.start.IsZero() {
		w.start = now
	}
	if w.netns == "" {
		if now.Before(w.sbRetry) {
			return
		}
		if err := w.createSandbox(ctx); err != nil {
			w.sbTries++
			w.sbErr = err
			w.sbRetry = now.Add(backoff(w.sbTries))
			w.log.Warn("create pod sandbox", "err", err)
			w.k.recorder.Eventf(w.pod, corev1.EventTypeWarning, "FailedCreatePodSandBox", "create pod sandbox: %v", err)
			return
		}
		w.sbErr = nil
	}
	for _, c := range w.inits {
		if c.finished && c.last != nil && c.last.ExitCode == 0 {
			continue
		}
		if c.finished { // failed for good: the pod fails
			w.finish()
			return
		}
		if !c.running() && !now.Before(c.nextStart) {
			w.startContainer(ctx, c)
		}
		return // init containers run one at a time, in order
	}
	for _, c := range w.ctrs {
		if !c.running() && !c.finished && !now.Before(c.nextStart) {
			w.startContainer(ctx, c)
		}
	}
	for _, c := range w.ctrs {
		if !c.finished {
			return
		}
	}
	w.finish()
}

// finish makes the pod terminal: nothing runs any more, the sandbox goes.
func (w *podWorker) finish() {
	w.terminal = true
	w.stopAndTeardown(0)
}

func (w *podWorker) createSandbox(ctx context.Context) error {
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return fmt.Errorf("create pod dir: %w", err)
	}
	if w.pod.Spec.HostNetwork {
		// The node's own namespace and address, no CNI: as a kubelet does.
		w.netns, w.podIP, w.hostNet = w.k.cfg.Netns, w.k.cfg.NodeIP, true
		return nil
	}
	name := w.k.cfg.PodNetnsPrefix + string(w.pod.UID)
	if !namedns.Exists(name) {
		if err := namedns.Create(name); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	ip, err := w.k.cni.add(ctx, w.pod, namedns.Path(name))
	if err != nil {
		_ = namedns.Delete(name)
		return err
	}
	w.netns, w.podIP = name, ip
	w.log.Info("pod sandbox ready", "netns", name, "pod_ip", ip.String())
	return nil
}

func (w *podWorker) startContainer(ctx context.Context, c *container) {
	env, envMap, err := w.containerEnv(ctx, c.spec)
	var (
		path string
		args []string
	)
	if err == nil {
		path, args, err = resolveCommand(c.spec, w.k.cfg.BinDirs, func(s string) string { return expandVars(s, envMap) })
	}
	var proc *nsproc.Process
	if err == nil {
		dir := c.spec.WorkingDir
		if dir == "" {
			dir = w.dir
		}
		proc, err = nsproc.Start(nsproc.Spec{
			Netns: w.netns,
			Path:  path,
			Args:  args,
			Env:   env,
			Dir:   dir,
			Log:   filepath.Join(w.dir, c.spec.Name+".log"),
		})
	}
	if err != nil {
		// Like CreateContainerError: retried with backoff whatever the policy.
		c.reason, c.message = "RunContainerError", err.Error()
		c.nextStart = time.Now().Add(backoff(c.restarts + 1))
		w.log.Warn("start container", "container", c.spec.Name, "err", err)
		w.k.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Failed", "start container %s: %v", c.spec.Name, err)
		return
	}
	if c.started {
		c.restarts++
	}
	c.proc, c.started, c.startedAt = proc, true, time.Now()
	c.reason, c.message = "", ""
	c.id = strconv.Itoa(proc.Pid()) + "-" + rand.String(6)
	c.ready = c.spec.ReadinessProbe == nil && !c.isInit
	w.log.Info("container started", "container", c.spec.Name, "pid", proc.Pid(), "cmd", path)
	w.k.recorder.Eventf(w.pod, corev1.EventTypeNormal, "Started", "Started container %s", c.spec.Name)

	pctx, cancel := context.WithCancel(ctx)
	c.stopProbe = cancel
	go func() { // RoutineWaitContainer: ends when the process exits
		<-proc.Done()
		code := int32(proc.ExitCode())
		w.post(func() { w.exited(c, proc, code) })
	}()
	if c.isInit {
		return
	}
	for kind, pr := range map[probeKind]*corev1.Probe{readiness: c.spec.ReadinessProbe, liveness: c.spec.LivenessProbe} {
		if pr == nil {
			continue
		}
		p := &prober{kind: kind, probe: pr, container: c.spec, nodeNetns: w.k.cfg.Netns, podNetns: w.netns, podIP: w.podIP}
		go p.run(pctx, func(ok bool, msg string) { // RoutineProbe: ends with pctx
			w.post(func() { w.probed(c, proc, kind, ok, msg) })
		})
	}
}

// exited records a container's exit and decides on its restart.
func (w *podWorker) exited(c *container, proc *nsproc.Process, code int32) {
	if c.proc != proc {
		return
	}
	c.stopProbe()
	c.proc, c.ready = nil, false
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	c.last = &corev1.ContainerStateTerminated{
		ExitCode:    code,
		Reason:      reason,
		StartedAt:   metav1.NewTime(c.startedAt),
		FinishedAt:  metav1.Now(),
		ContainerID: "tunmesh-standin://" + c.id,
	}
	policy := w.pod.Spec.RestartPolicy
	if c.isInit && policy == corev1.RestartPolicyAlways {
		policy = corev1.RestartPolicyOnFailure // init containers restart only on failure
	}
	if w.terminal || !willRestart(policy, code) {
		c.finished = true
		w.log.Info("container finished", "container", c.spec.Name, "exit_code", code)
		return
	}
	c.reason, c.message = "CrashLoopBackOff", fmt.Sprintf("back-off restarting container %s (exit code %d)", c.spec.Name, code)
	c.nextStart = time.Now().Add(backoff(c.restarts + 1))
	w.log.Info("container exited, restarting", "container", c.spec.Name, "exit_code", code, "restarts", c.restarts)
}

func (w *podWorker) probed(c *container, proc *nsproc.Process, kind probeKind, ok bool, msg string) {
	if c.proc != proc {
		return
	}
	if !ok {
		w.k.recorder.Eventf(w.pod, corev1.EventTypeWarning, "Unhealthy", "%s probe failed: %s", kind, msg)
	}
	switch kind {
	case readiness:
		c.ready = ok
	case liveness:
		if !ok {
			w.k.recorder.Eventf(w.pod, corev1.EventTypeNormal, "Killing", "Container %s failed liveness probe, will be restarted", c.spec.Name)
			go proc.Stop(gracePeriod(w.pod)) // the exit arrives through exited()
		}
	}
}

// stopAndTeardown stops every container (SIGTERM, grace, SIGKILL), then
// removes the pod's network: CNI DEL, any process left in the namespace,
// the namespace itself.
func (w *podWorker) stopAndTeardown(grace time.Duration) {
	var wg sync.WaitGroup
	for _, c := range append(w.inits[:len(w.inits):len(w.inits)], w.ctrs...) {
		if c.proc == nil {
			continue
		}
		c.stopProbe()
		wg.Add(1)
		go func(p *nsproc.Process) {
			defer wg.Done()
			p.Stop(grace)
		}(c.proc)
	}
	wg.Wait()
	if w.netns == "" {
		return
	}
	if w.hostNet { // the node's namespace is not the pod's to remove
		w.netns = ""
		return
	}
	if pids, err := namedns.Pids(w.netns); err == nil {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.k.cni.del(ctx, w.pod, namedns.Path(w.netns)); err != nil {
		w.log.Warn("tear down pod network", "err", err)
	}
	if err := namedns.Delete(w.netns); err != nil {
		w.log.Warn("delete pod netns", "err", err)
	}
	w.log.Info("pod sandbox removed", "netns", w.netns)
	w.netns = ""
}

// finalDelete removes the pod object once nothing of it runs, as a kubelet
// does after graceful termination.
func (w *podWorker) finalDelete(ctx context.Context) {
	uid := w.pod.UID
	err := w.k.client.CoreV1().Pods(w.pod.Namespace).Delete(ctx, w.pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To(int64(0)),
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		w.log.Warn("delete pod", "err", err)
	}
}

// containerEnv builds a container's environment: PATH, HOSTNAME and the
// kubernetes Service variables, then the spec's env in order ($(VAR)
// references to earlier entries expanded).
func (w *podWorker) containerEnv(ctx context.Context, c corev1.Container) ([]string, map[string]string, error) {
	m := map[string]string{
		"PATH":                    os.Getenv("PATH"),
		"HOSTNAME":                w.pod.Name,
		"KUBERNETES_SERVICE_HOST": w.k.cfg.ServiceHost,
		"KUBERNETES_SERVICE_PORT": "443",
	}
	order := []string{"PATH", "HOSTNAME", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
	for _, e := range c.Env {
		v, err := w.envValue(ctx, e, m)
		if err != nil {
			return nil, nil, fmt.Errorf("container %q env %q: %w", c.Name, e.Name, err)
		}
		if _, ok := m[e.Name]; !ok {
			order = append(order, e.Name)
		}
		m[e.Name] = v
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+m[k])
	}
	return env, m, nil
}

var errEnvSource = errors.New("unsupported env source")

func (w *podWorker) envValue(ctx context.Context, e corev1.EnvVar, m map[string]string) (string, error) {
	src := e.ValueFrom
	if src == nil {
		return expandVars(e.Value, m), nil
	}
	pod := w.pod
	switch {
	case src.FieldRef != nil:
		switch p := src.FieldRef.FieldPath; p {
		case "metadata.name":
			return pod.Name, nil
		case "metadata.namespace":
			return pod.Namespace, nil
		case "metadata.uid":
			return string(pod.UID), nil
		case "spec.nodeName":
			return pod.Spec.NodeName, nil
		case "spec.serviceAccountName":
			return pod.Spec.ServiceAccountName, nil
		case "status.podIP", "status.podIPs":
			return w.podIP.String(), nil
		case "status.hostIP", "status.hostIPs":
			return w.k.cfg.NodeIP.String(), nil
		default:
			return "", fmt.Errorf("fieldRef %q: %w", p, errEnvSource)
		}
	case src.ConfigMapKeyRef != nil:
		r := src.ConfigMapKeyRef
		cm, err := w.k.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if err == nil {
			if v, ok := cm.Data[r.Key]; ok {
				return v, nil
			}
		}
		if r.Optional != nil && *r.Optional {
			return "", nil
		}
		return "", fmt.Errorf("configmap %q key %q: not found (%v)", r.Name, r.Key, err)
	case src.SecretKeyRef != nil:
		r := src.SecretKeyRef
		s, err := w.k.client.CoreV1().Secrets(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if err == nil {
			if v, ok := s.Data[r.Key]; ok {
				return string(v), nil
			}
		}
		if r.Optional != nil && *r.Optional {
			return "", nil
		}
		return "", fmt.Errorf("secret %q key %q: not found (%v)", r.Name, r.Key, err)
	default:
		return "", errEnvSource
	}
}
