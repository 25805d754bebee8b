package devcluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/kubebuild"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// KubernetesVersion is the release of the control-plane binaries the local
// cluster runs (and the kubelet version its nodes report).
var KubernetesVersion = kubebuild.Version()

// supervisorPID returns the pid recorded for the cluster's supervisor if
// that process is alive and really is this cluster's supervisor (a recycled
// pid must never be signalled).
func supervisorPID(cfg Config) (int, bool) {
	b, err := os.ReadFile(cfg.path(pidFile))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return 0, false
	}
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	isSupervisor, named := false, false
	for i, a := range args {
		if a == "supervise" {
			isSupervisor = true
		}
		if (a == "--name" || a == "-name") && i+1 < len(args) && args[i+1] == cfg.Name {
			named = true
		}
		if a == "--name="+cfg.Name || a == "-name="+cfg.Name {
			named = true
		}
	}
	return pid, isSupervisor && named
}

func supervisorAlive(cfg Config) bool {
	_, ok := supervisorPID(cfg)
	return ok
}

// Running reports whether the named cluster's supervisor is alive.
func Running(cfg Config) bool {
	cfg, err := cfg.WithDefaults()
	return err == nil && supervisorAlive(cfg)
}

// Leftovers lists what a cluster of this name still has on the machine:
// namespaces and its state directory. Empty means nothing is left.
func Leftovers(cfg Config) ([]string, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return nil, err
	}
	names, err := namedns.List(cfg.nsPrefix())
	if err != nil {
		return nil, err
	}
	var left []string
	for _, n := range names {
		left = append(left, "netns "+n)
	}
	if _, err := os.Stat(cfg.Dir()); err == nil {
		left = append(left, "dir "+cfg.Dir())
	}
	return left, nil
}

// Up starts the cluster in a detached supervisor process (self is the
// tunmeshctl binary, run as `self dev supervise ...`) and streams its
// progress to out until the cluster is ready or fails.
func Up(ctx context.Context, cfg Config, self string, out io.Writer) error {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	if supervisorAlive(cfg) {
		fmt.Fprintf(out, "cluster %q is already running\n", cfg.Name)
		return nil
	}
	if err := checkPrerequisites(cfg); err != nil {
		return err
	}
	// A crashed run may have left namespaces or state behind.
	if err := sweep(cfg); err != nil {
		return fmt.Errorf("clean up previous cluster %q: %w", cfg.Name, err)
	}
	if err := os.MkdirAll(cfg.path("logs"), 0o755); err != nil {
		return fmt.Errorf("create cluster dir: %w", err)
	}
	logf, err := os.OpenFile(cfg.path("logs", "supervisor.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open supervisor log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(self, "dev", "supervise",
		"--name", cfg.Name, "--nodes", strconv.Itoa(cfg.Nodes), "--root", cfg.Root,
		"--kube-bin-dir", cfg.KubeBinDir, "--bin-dir", cfg.BinDir,
		"--cni-bin-dir", cfg.CNIBinDir, "--etcd", cfg.Etcd, "--mesh="+strconv.FormatBool(cfg.Mesh),
		"--real-nodes="+strconv.FormatBool(cfg.RealNodes), "--image-dir", cfg.ImageDir,
		"--transport", cfg.Transport, "--encrypt-all="+strconv.FormatBool(cfg.EncryptAll), "--wireguard-mtu", strconv.Itoa(cfg.WireGuardMTU),
		"--wireguard-required="+strconv.FormatBool(cfg.WireGuardRequired))
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the cluster outlives the shell that ran `up`.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cloexecInherited(); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start supervisor: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps the supervisor if it dies while we watch
	fmt.Fprintf(out, "starting cluster %q (supervisor pid %d, logs in %s)\n", cfg.Name, cmd.Process.Pid, cfg.path("logs"))
	return followProgress(ctx, cfg, out, exited, 5*time.Minute)
}

// followProgress prints the supervisor's progress lines until READY, a
// FAILED line, the supervisor's exit, or the timeout.
func followProgress(ctx context.Context, cfg Config, out io.Writer, exited <-chan error, timeout time.Duration) error {
	deadline := time.After(timeout)
	var offset int64
	for {
		f, err := os.Open(cfg.path(progressFile))
		if err == nil {
			_, _ = f.Seek(offset, io.SeekStart)
			r := bufio.NewReader(f)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					break // partial line: read again next round
				}
				offset += int64(len(line))
				line = strings.TrimSuffix(line, "\n")
				switch {
				case line == progressReady:
					f.Close()
					return nil
				case strings.HasPrefix(line, progressFailed):
					f.Close()
					return fmt.Errorf("cluster %q failed to start: %s (logs in %s)", cfg.Name, strings.TrimPrefix(line, progressFailed), cfg.path("logs"))
				default:
					fmt.Fprintf(out, "  %s\n", line)
				}
			}
			f.Close()
		}
		select {
		case err := <-exited:
			return fmt.Errorf("cluster %q: supervisor exited (%v) before the cluster was ready; see %s", cfg.Name, err, cfg.path("logs", "supervisor.log"))
		case <-deadline:
			return fmt.Errorf("cluster %q not ready after %s; see %s", cfg.Name, timeout, cfg.path("logs"))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ErrMissingPrerequisite means a binary the cluster runs is not installed.
var ErrMissingPrerequisite = errors.New("missing prerequisite (run `make deps`)")

func checkPrerequisites(cfg Config) error {
	if os.Geteuid() != 0 {
		return errors.New("the local cluster needs root (network namespaces, veth, mounts)")
	}
	need := []string{
		cfg.Etcd,
		cfg.CNIBinDir + "/bridge",
		cfg.CNIBinDir + "/host-local",
		cfg.KubeBinDir + "/kube-apiserver",
		cfg.KubeBinDir + "/kube-controller-manager",
	}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%s: %w", p, ErrMissingPrerequisite)
		}
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return fmt.Errorf("nsenter: %w", ErrMissingPrerequisite)
	}
	if cfg.RealNodes {
		for _, p := range []string{cfg.KubeBinDir + "/kubelet", cfg.KubeBinDir + "/kube-scheduler"} {
			if _, err := os.Stat(p); err != nil {
				return fmt.Errorf("%s: %w", p, ErrMissingPrerequisite)
			}
		}
		for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "unshare"} {
			if _, err := exec.LookPath(b); err != nil {
				return fmt.Errorf("%s: %w", b, ErrMissingPrerequisite)
			}
		}
		if _, err := imageArchives(cfg); err != nil {
			return err
		}
	}
	return nil
}

// Down stops the cluster's supervisor (which tears the cluster down) and
// then removes whatever is left, also after a crash: every process inside
// the cluster's namespaces, the namespaces, the state directory.
func Down(cfg Config, out io.Writer) error {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	if pid, ok := supervisorPID(cfg); ok {
		fmt.Fprintf(out, "stopping cluster %q (supervisor pid %d)\n", cfg.Name, pid)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(90 * time.Second)
		for supervisorAlive(cfg) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if supervisorAlive(cfg) {
			fmt.Fprintf(out, "supervisor did not stop in time; killing it\n")
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if err := sweep(cfg); err != nil {
		return err
	}
	left, err := Leftovers(cfg)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("cluster %q: could not remove: %s", cfg.Name, strings.Join(left, ", "))
	}
	fmt.Fprintf(out, "cluster %q removed\n", cfg.Name)
	return nil
}

// sweep kills every process in the cluster's namespaces, deletes the
// namespaces and removes the state directory. Only names with the
// cluster's prefix are touched.
func sweep(cfg Config) error {
	names, err := namedns.List(cfg.nsPrefix())
	if err != nil {
		return err
	}
	var errs []error
	// Real nodes first: their containers hold mounts in the state
	// directory and processes outside the namespaces listed here.
	if err := sweepRealNodes(cfg); err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		pids, err := namedns.Pids(n)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, n := range names {
		// Wait briefly for killed processes to go so the namespace really dies.
		for i := 0; i < 50; i++ {
			pids, _ := namedns.Pids(n)
			if len(pids) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := namedns.Delete(n); err != nil {
			errs = append(errs, err)
		}
	}
	if !supervisorAlive(cfg) {
		if err := os.RemoveAll(cfg.Dir()); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", cfg.Dir(), err))
		}
	}
	return errors.Join(errs...)
}
