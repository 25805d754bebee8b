package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/tools/internal/bench"
	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// benchNS is the Kubernetes namespace of the benchmark's pods.
const benchNS = "tunmesh-bench"

// agentAdminPort is the agents' admin port on the local cluster
// (devcluster's agentAdmin).
const agentAdminPort = 4191

var optOut = map[string]string{"tunmesh.io/inject": "disabled"}

// cluster is a running local cluster brought up by this run.
type cluster struct {
	cfg    devcluster.Config
	ctl    string
	state  *devcluster.State
	client kubernetes.Interface
	log    *slog.Logger
}

// up boots the cluster with `tunmeshctl dev up`, holding the machine's
// boot lock (one cluster boots at a time on a machine) only while it boots.
// The returned cluster is torn down by down, which the caller defers even
// when up fails half-way.
func up(ctx context.Context, cfg Config, log *slog.Logger) (*cluster, error) {
	dc, err := devcluster.Config{Name: cfg.Name, Root: cfg.Root}.WithDefaults()
	if err != nil {
		return nil, err
	}
	c := &cluster{cfg: dc, ctl: cfg.Ctl, log: log}
	if devcluster.Running(dc) {
		return nil, fmt.Errorf("cluster %q is already running (not ours to use or remove; pick another --name)", dc.Name)
	}
	unlock, err := lockFile(ctx, cfg.BootLock, log)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	log.Info("booting cluster", "cluster", dc.Name, "nodes", 2)
	upErr := c.tunmeshctl(ctx, os.Stderr, "dev", "up", "--nodes", "2", "--transport", cfg.Transport, "--encrypt-all="+strconv.FormatBool(cfg.EncryptAll), "--wireguard-mtu", strconv.Itoa(cfg.WireGuardMTU))
	unlock()
	if upErr != nil {
		return c, fmt.Errorf("dev up %s: %w", dc.Name, upErr)
	}
	log.Info("cluster up", "cluster", dc.Name, "took", time.Since(start).Round(100*time.Millisecond))
	if c.state, err = devcluster.ReadState(dc); err != nil {
		return c, err
	}
	if c.client, err = devcluster.Client(c.state); err != nil {
		return c, err
	}
	return c, nil
}

// down removes the cluster; it runs on a fresh context so that Ctrl-C,
// which cancelled the run, still tears down.
func (c *cluster) down() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c.log.Info("tearing down cluster", "cluster", c.cfg.Name)
	if err := c.tunmeshctl(ctx, os.Stderr, "dev", "down"); err != nil {
		return fmt.Errorf("dev down %s: %w", c.cfg.Name, err)
	}
	return nil
}

func (c *cluster) tunmeshctl(ctx context.Context, out *os.File, args ...string) error {
	full := append(append(args[:2:2], "--name", c.cfg.Name, "--root", c.cfg.Root), args[2:]...)
	cmd := exec.CommandContext(ctx, c.ctl, full...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 10 * time.Second
	return cmd.Run()
}

// lockFile takes an exclusive flock on path (created if missing); "" takes
// nothing. It waits, logging once, while someone else holds it.
func lockFile(ctx context.Context, path string, log *slog.Logger) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open boot lock: %w", err)
	}
	logged := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !logged {
			log.Info("waiting for the boot lock (another cluster is booting)", "lock", path)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// podSpec is a benchmark pod: containers are commands from the host (the
// stand-in kubelet resolves them in PATH).
type podSpec struct {
	name, node, sa string
	meshed         bool
	containers     [][]string // argv per container
}

func (c *cluster) namespace(ctx context.Context, sas ...string) error {
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNS}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", benchNS, err)
	}
	for _, sa := range sas {
		_, err := c.client.CoreV1().ServiceAccounts(benchNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create service account %s: %w", sa, err)
		}
	}
	return nil
}

func (c *cluster) createPod(ctx context.Context, s podSpec) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Labels: map[string]string{"app": "tunmesh-bench"}},
		Spec: corev1.PodSpec{
			ServiceAccountName: s.sa,
			NodeSelector:       map[string]string{"kubernetes.io/hostname": s.node},
		},
	}
	if !s.meshed {
		pod.Annotations = optOut
	}
	for i, argv := range s.containers {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{
			Name: "c" + strconv.Itoa(i), Image: "bench", Command: argv,
		})
	}
	if _, err := c.client.CoreV1().Pods(benchNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create pod %s: %w", s.name, err)
	}
	return nil
}

// waitRunning waits until every named pod runs with an IP and returns
// them by name.
func (c *cluster) waitRunning(ctx context.Context, timeout time.Duration, names ...string) (map[string]*corev1.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out := map[string]*corev1.Pod{}
	for {
		list, err := c.client.CoreV1().Pods(benchNS).List(ctx, metav1.ListOptions{})
		if err == nil {
			for i := range list.Items {
				p := &list.Items[i]
				if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
					out[p.Name] = p
				}
			}
		}
		missing := slices.DeleteFunc(slices.Clone(names), func(n string) bool { return out[n] != nil })
		if len(missing) == 0 {
			return out, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pods not running after %s: %v: %w", timeout, missing, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// podNetns is the named network namespace of a running pod.
func (c *cluster) podNetns(p *corev1.Pod) string { return c.cfg.PodNetnsPrefix() + string(p.UID) }

// inPod runs argv in the pod's network namespace (nsenter: no API call,
// so the cost outside the measured tool is small) and returns its stdout;
// stderr is included in the error.
func (c *cluster) inPod(ctx context.Context, p *corev1.Pod, timeout time.Duration, argv ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	args := append([]string{"--net=" + namedns.Path(c.podNetns(p)), "--"}, argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s in pod %s: %w: %s", argv[0], p.Name, err, lastLine(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// procs finds live processes whose argv matches.
func procs(match func(argv []string) bool) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		if match(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// agentPids maps node name to the pid of this cluster's tunmesh-node agent
// on it (the agent's state dir lies under the cluster's directory).
func (c *cluster) agentPids() (map[string]int, error) {
	dir := c.cfg.Dir() + string(filepath.Separator)
	out := map[string]int{}
	for _, pid := range procs(func(argv []string) bool {
		return filepath.Base(argv[0]) == "tunmesh-node" && slices.ContainsFunc(argv, func(a string) bool { return strings.HasPrefix(a, dir) })
	}) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		argv := strings.Split(string(b), "\x00")
		if i := slices.Index(argv, "--node-name"); i >= 0 && i+1 < len(argv) {
			out[argv[i+1]] = pid
		}
	}
	if len(out) != len(c.state.Nodes) {
		return out, fmt.Errorf("found agents on %d of %d nodes of cluster %s", len(out), len(c.state.Nodes), c.cfg.Name)
	}
	return out, nil
}

// cpuOf is the summed user+system CPU of pids; a process that is gone
// counts as an error (its CPU would be lost silently).
func cpuOf(pids []int) (time.Duration, error) {
	var total time.Duration
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, fmt.Errorf("read cpu of pid %d: %w", pid, err)
		}
		d, err := bench.ParseProcStatCPU(b)
		if err != nil {
			return 0, fmt.Errorf("pid %d: %w", pid, err)
		}
		total += d
	}
	return total, nil
}

// rssMB is a process's VmRSS in MiB.
func rssMB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	n, err := bench.ParseVmRSS(b)
	if err != nil {
		return 0, fmt.Errorf("pid %d: %w", pid, err)
	}
	return float64(n) / (1 << 20), nil
}

// smaps is a process's smaps_rollup: its RSS split into anonymous memory
// and mapped files.
func smaps(pid int) (bench.Smaps, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return bench.Smaps{}, fmt.Errorf("read smaps_rollup of pid %d: %w", pid, err)
	}
	s, err := bench.ParseSmapsRollup(b)
	if err != nil {
		return bench.Smaps{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return s, nil
}

// agentProfiles reads every agent's goroutine and heap profiles from its
// debug address (devcluster.AgentDebugAddr, loopback inside the node's
// network namespace), in node order. A profile that cannot be read is
// reported as such, not as an error: the memory figures stand without it.
func (c *cluster) agentProfiles(ctx context.Context) []bench.AgentProfile {
	var out []bench.AgentProfile
	for _, n := range c.state.Nodes {
		p := bench.AgentProfile{Node: n.Name}
		get := func(path string) ([]byte, error) {
			client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(n.Netns)}}
			defer client.CloseIdleConnections()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+devcluster.AgentDebugAddr+path, nil)
			if err != nil {
				return nil, err
			}
			resp, err := client.Do(req)
			if err != nil {
				return nil, err
			}
			defer resp.Body.Close()
			var buf bytes.Buffer
			if _, err := buf.ReadFrom(resp.Body); err != nil {
				return nil, fmt.Errorf("read %s: %w", path, err)
			}
			if resp.StatusCode != http.StatusOK {
				return nil, fmt.Errorf("%s: %s", path, resp.Status)
			}
			return buf.Bytes(), nil
		}
		if b, err := get("/debug/pprof/goroutine?debug=1"); err != nil {
			p.GoroutineErr = err
		} else {
			p.Goroutines, p.GoroutineTotal, p.GoroutineErr = bench.ParseGoroutineProfile(b)
		}
		if b, err := get("/debug/pprof/heap?debug=1"); err != nil {
			p.HeapErr = err
		} else {
			p.Heap, p.HeapTotal, p.HeapErr = bench.ParseHeapProfile(b)
		}
		out = append(out, p)
	}
	return out
}

// agentMetrics reads a node's agent /metrics; ok is false when it does
// not answer.
func (c *cluster) agentMetrics(ctx context.Context, node string) (bench.AgentMetrics, bool) {
	for _, n := range c.state.Nodes {
		if n.Name != node {
			continue
		}
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(n.Netns)}}
		defer client.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(n.IP, strconv.Itoa(agentAdminPort))+"/metrics", nil)
		if err != nil {
			return bench.AgentMetrics{}, false
		}
		resp, err := client.Do(req)
		if err != nil {
			return bench.AgentMetrics{}, false
		}
		defer resp.Body.Close()
		var buf bytes.Buffer
		if _, err := buf.ReadFrom(resp.Body); err != nil || resp.StatusCode != http.StatusOK {
			return bench.AgentMetrics{}, false
		}
		return bench.ParseAgentMetrics(buf.Bytes()), true
	}
	return bench.AgentMetrics{}, false
}
