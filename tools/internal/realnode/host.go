package realnode

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// CgroupFS is where the cgroup hierarchies are mounted (a variable for tests).
var CgroupFS = "/sys/fs/cgroup"

// hierarchies lists the mounted cgroup hierarchies: every directory under
// CgroupFS that is a mount point (v1 controllers, name=systemd, and the
// v2 "unified" tree of a hybrid host). Symlinks (cpu -> cpu,cpuacct) are
// skipped so that each tree is visited once.
func hierarchies() ([]string, error) {
	ents, err := os.ReadDir(CgroupFS)
	if err != nil {
		return nil, fmt.Errorf("list cgroup hierarchies: %w", err)
	}
	var out []string
	for _, e := range ents {
		if e.Type()&fs.ModeSymlink != 0 || !e.IsDir() {
			continue
		}
		out = append(out, filepath.Join(CgroupFS, e.Name()))
	}
	return out, nil
}

// prepareCgroupRoot creates root (e.g. "/tunmesh-rk-node-1") in every
// hierarchy; in cpuset it copies cpus and mems from the parent, without
// which no task can join it.
func prepareCgroupRoot(root string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := filepath.Join(h, root)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		if filepath.Base(h) == "cpuset" || strings.Contains(filepath.Base(h), "cpuset") {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("read %s: %w", f, err)
				}
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					return fmt.Errorf("write %s/%s: %w", dir, f, err)
				}
			}
		}
	}
	return nil
}

// cgroupPids returns every pid in root's subtree, in every hierarchy.
func cgroupPids(root string) ([]int, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	seen := map[int]bool{}
	for _, h := range hs {
		dir := filepath.Join(h, root)
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil // the cgroup went away
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					seen[pid] = true
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("walk cgroup %s: %w", dir, err)
		}
	}
	pids := make([]int, 0, len(seen))
	for p := range seen {
		pids = append(pids, p)
	}
	sort.Ints(pids)
	return pids, nil
}

// removeCgroups removes root's subtree in every hierarchy, deepest first
// (rmdir of a cgroup with children fails). It retries while tasks leave.
func removeCgroups(root string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		dir := filepath.Join(h, root)
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		// Deeper paths sort after their parents; remove in reverse.
		sort.Strings(dirs)
		for i := len(dirs) - 1; i >= 0; i-- {
			var rerr error
			for try := 0; try < 50; try++ {
				rerr = unix.Rmdir(dirs[i])
				if rerr == nil || errors.Is(rerr, unix.ENOENT) {
					rerr = nil
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if rerr != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], rerr))
			}
		}
	}
	return errors.Join(errs...)
}

// CgroupRoots lists the cgroup roots (as "/name") starting with prefix that
// exist in any hierarchy.
func CgroupRoots(prefix string) ([]string, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, h := range hs {
		ents, err := os.ReadDir(h)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
				seen["/"+e.Name()] = true
			}
		}
	}
	var out []string
	for r := range seen {
		out = append(out, r)
	}
	sort.Strings(out)
	return out, nil
}

// mntnsInode returns the inode of a mount-namespace file (a bind-mounted
// nsfs file or /proc/<pid>/ns/mnt).
func mntnsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// pidsInMntns lists the processes whose mount namespace is ino: the node's
// containerd, kubelet and containerd-shim processes (containers get mount
// namespaces of their own and are found through the cgroup instead).
func pidsInMntns(ino uint64) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if i, err := mntnsInode("/proc/" + e.Name() + "/ns/mnt"); err == nil && i == ino {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killAll SIGKILLs pids and waits until they are gone (or timeout).
func killAll(pids func() []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := pids()
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes still alive after SIGKILL: %v", left)
		}
		for _, p := range left {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// newMountNamespace creates a persistent mount namespace bound at file,
// makes its root rshared (runc's HostToContainer mounts need a shared or
// slave parent) and bind-mounts each host path in binds (target -> source)
// inside it. The host's own mounts and propagation are untouched. Missing
// mount points are created on the host and recorded in created, so that
// teardown removes them.
func newMountNamespace(file string, binds map[string]string, created func(string) error) error {
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		return fmt.Errorf("create mount namespace file: %w", err)
	}
	if out, err := exec.Command("unshare", "--mount="+file, "--propagation", "unchanged", "true").CombinedOutput(); err != nil {
		return fmt.Errorf("unshare mount namespace: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := inMntns(file, "mount", "--make-rshared", "/"); err != nil {
		return err
	}
	targets := make([]string, 0, len(binds))
	for t := range binds {
		targets = append(targets, t)
	}
	sort.Strings(targets)
	for _, t := range targets {
		if err := mkdirRecorded(t, created); err != nil {
			return err
		}
		if err := os.MkdirAll(binds[t], 0o755); err != nil {
			return fmt.Errorf("create %s: %w", binds[t], err)
		}
		if err := inMntns(file, "mount", "--bind", binds[t], t); err != nil {
			return err
		}
	}
	return nil
}

// mkdirRecorded creates dir and its missing parents, recording each
// created directory (outermost first) before creating it.
func mkdirRecorded(dir string, created func(string) error) error {
	var missing []string
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := created(missing[i]); err != nil {
			return err
		}
		if err := os.Mkdir(missing[i], 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create mount point %s: %w", missing[i], err)
		}
	}
	return nil
}

func inMntns(file string, args ...string) error {
	cmd := exec.Command("nsenter", append([]string{"--mount=" + file, "--"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s in node mount namespace: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// releaseMountNamespace unmounts the namespace file; the namespace (and
// every mount in it) is freed once no process uses it.
func releaseMountNamespace(file string) error {
	err := unix.Unmount(file, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", file, err)
	}
	return nil
}

// Host state shared by every real node on the machine: the sysctls before
// the first kubelet, the mount points created on the host, the clusters
// using them.
type hostState struct {
	Sysctls     map[string]string `json:"sysctls"`
	MountPoints []string          `json:"mountPoints"`
	Users       []string          `json:"users"`
}

func readHostState(path string) (hostState, error) {
	var st hostState
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("read host state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("parse host state %s: %w", path, err)
	}
	return st, nil
}

func writeHostState(path string, st hostState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path+".tmp", b, 0o644); err != nil {
		return fmt.Errorf("write host state: %w", err)
	}
	return os.Rename(path+".tmp", path)
}

// ProcSys is where sysctls are read and written (a variable for tests).
var ProcSys = "/proc/sys"

func sysctlPath(key string) string {
	return filepath.Join(ProcSys, strings.ReplaceAll(key, ".", "/"))
}

// ReadSysctls reads the given host sysctls.
func ReadSysctls(keys []string) (map[string]string, error) {
	out := map[string]string{}
	for _, k := range keys {
		b, err := os.ReadFile(sysctlPath(k))
		if err != nil {
			return nil, fmt.Errorf("read sysctl %s: %w", k, err)
		}
		out[k] = strings.TrimSpace(string(b))
	}
	return out, nil
}

func writeSysctls(vals map[string]string) error {
	var errs []error
	for k, v := range vals {
		if err := os.WriteFile(sysctlPath(k), []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore sysctl %s=%s: %w", k, v, err))
		}
	}
	return errors.Join(errs...)
}
