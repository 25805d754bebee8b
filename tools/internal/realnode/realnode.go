// Package realnode runs a Kubernetes node the real way on a developer
// machine: Debian's containerd and runc plus a kubelet built from the pinned
// Kubernetes module, inside the node's network namespace and a private mount
// namespace shared by containerd and the kubelet (runc must see the
// kubelet's volume mounts). In that mount namespace per-node directories are
// bind-mounted over the standard host paths (Mounts), so the node looks like
// a real one to a DaemonSet's hostPath volumes while the host stays
// untouched; cgroups live under a cgroup root of the node's own.
//
// Teardown leaves nothing behind: the kubelet and containerd are stopped,
// containers and shims killed through the node's cgroup root and mount
// namespace, cgroups removed depth-first, the mount namespace released, and
// (by Host) the host sysctls the kubelet changed restored and the mount
// points created on the host removed. Sweep does the same after a crash.
package realnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// Config describes one real node.
type Config struct {
	Name       string       // node name (--hostname-override)
	Netns      string       // the node's named network namespace
	NodeIP     netip.Addr   // underlay address (--node-ip, kubelet address)
	Dir        string       // the node's state directory on the host
	CNIConfDir string       // host dir bound over /etc/cni/net.d (holds the primary conflist)
	CNIBinDir  string       // host dir bound over /opt/cni/bin
	PluginDir  string       // reference CNI plugins linked into CNIBinDir (/usr/lib/cni)
	KubeBinDir string       // kubelet
	Kubeconfig string       // the kubelet's credentials (system:node:<name>)
	ClientCA   string       // CA of the API server's kubelet client certificate
	Images     []string     // OCI archives imported into containerd before the kubelet starts
	CgroupRoot string       // "/<cluster>-<node>": a cgroup tree of the node's own
	LogDir     string       // containerd-<node>.log, kubelet-<node>.log
	Log        *slog.Logger // required
}

func (c Config) validate() error {
	switch {
	case c.Name == "" || c.Netns == "" || c.Dir == "" || c.CNIConfDir == "" || c.CNIBinDir == "" || c.PluginDir == "" || c.KubeBinDir == "" || c.LogDir == "":
		return errors.New("realnode config: name, netns, dirs and log dir are required")
	case !c.NodeIP.IsValid():
		return errors.New("realnode config: no node IP")
	case c.Kubeconfig == "" || c.ClientCA == "":
		return errors.New("realnode config: kubeconfig and client CA are required")
	case !strings.HasPrefix(c.CgroupRoot, "/") || strings.Count(c.CgroupRoot, "/") != 1 || len(c.CgroupRoot) < 2:
		return fmt.Errorf("realnode config: cgroup root %q must be one top-level name", c.CgroupRoot)
	case len(c.Images) == 0:
		return errors.New("realnode config: no images (at least the pause image)")
	case c.Log == nil:
		return errors.New("realnode config: nil logger")
	}
	return nil
}

// Node is one running real node. New starts nothing; Run starts containerd
// and the kubelet and blocks until ctx ends or one of them dies, then tears
// the node down.
type Node struct {
	cfg          Config
	host         *Host
	sandboxImage string
	log          *slog.Logger

	mu    sync.Mutex // guards procs
	procs []*nsproc.Process
}

// New checks the configuration and finds the pause image among the images.
func New(cfg Config, host *Host) (*Node, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if host == nil {
		return nil, errors.New("realnode: nil host")
	}
	sandbox := ""
	for _, a := range cfg.Images {
		ref, err := ArchiveRef(a)
		if err != nil {
			return nil, err
		}
		if strings.Contains(ref, "/tunmesh-pause:") {
			sandbox = ref
		}
	}
	if sandbox == "" {
		return nil, fmt.Errorf("realnode: no tunmesh-pause image among %v", cfg.Images)
	}
	return &Node{cfg: cfg, host: host, sandboxImage: sandbox, log: cfg.Log.With("node", cfg.Name)}, nil
}

func (n *Node) path(elem ...string) string {
	return filepath.Join(append([]string{n.cfg.Dir}, elem...)...)
}

func (n *Node) mntnsFile() string { return n.path("mntns") }

// Run brings the node up, waits, and tears it down.
func (n *Node) Run(ctx context.Context) error {
	defer func() {
		if err := n.teardown(); err != nil {
			n.log.Warn("tear down real node", "err", err)
		}
	}()
	if err := n.start(ctx); err != nil {
		return fmt.Errorf("node %s: %w", n.cfg.Name, err)
	}
	done := make(chan string, 2)
	n.mu.Lock()
	for i, p := range n.procs {
		name := []string{"containerd", "kubelet"}[i]
		go func() { // RoutineWatchProcess: ends when the process exits
			<-p.Done()
			done <- fmt.Sprintf("%s of node %s exited with code %d (log: %s)", name, n.cfg.Name, p.ExitCode(), filepath.Join(n.cfg.LogDir, name+"-"+n.cfg.Name+".log"))
		}()
	}
	n.mu.Unlock()
	select {
	case <-ctx.Done():
		return nil
	case msg := <-done:
		if ctx.Err() != nil {
			return nil
		}
		return errors.New(msg)
	}
}

func (n *Node) start(ctx context.Context) error {
	for _, d := range []string{n.cfg.Dir, n.cfg.CNIConfDir, n.cfg.CNIBinDir, n.cfg.LogDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	if err := linkPlugins(n.cfg.PluginDir, n.cfg.CNIBinDir); err != nil {
		return err
	}
	if err := n.host.prepare(); err != nil {
		return err
	}
	binds := map[string]string{CNIConfDir: n.cfg.CNIConfDir, CNIBinDir: n.cfg.CNIBinDir}
	for _, m := range Mounts {
		if _, ok := binds[m]; !ok {
			binds[m] = n.path("host", m)
		}
	}
	if err := newMountNamespace(n.mntnsFile(), binds, n.host.recordMountPoint); err != nil {
		return err
	}
	if err := prepareCgroupRoot(n.cfg.CgroupRoot); err != nil {
		return err
	}

	conf, err := ContainerdConfig(n.sandboxImage)
	if err != nil {
		return err
	}
	if err := os.WriteFile(n.path("containerd.toml"), []byte(conf), 0o644); err != nil {
		return fmt.Errorf("write containerd config: %w", err)
	}
	if err := n.startProc("containerd", "containerd", "--config", n.path("containerd.toml")); err != nil {
		return err
	}
	// The socket is a file in the node's /run/containerd, which is this
	// directory on the host.
	sock := n.path("host", ContainerdSocket)
	if err := waitFor(ctx, 30*time.Second, func() bool { _, err := os.Stat(sock); return err == nil }); err != nil {
		return fmt.Errorf("containerd socket %s: %w", sock, err)
	}
	for _, a := range n.cfg.Images {
		out, err := exec.CommandContext(ctx, "ctr", "--address", sock, "--namespace", "k8s.io", "images", "import", a).CombinedOutput()
		if err != nil {
			return fmt.Errorf("import %s: %w: %s", a, err, strings.TrimSpace(string(out)))
		}
	}

	kc, err := KubeletConfig(n.cfg.NodeIP, n.cfg.CgroupRoot, n.cfg.ClientCA)
	if err != nil {
		return err
	}
	if err := os.WriteFile(n.path("kubelet.yaml"), []byte(kc), 0o644); err != nil {
		return fmt.Errorf("write kubelet config: %w", err)
	}
	return n.startProc("kubelet", filepath.Join(n.cfg.KubeBinDir, "kubelet"),
		"--config="+n.path("kubelet.yaml"),
		"--kubeconfig="+n.cfg.Kubeconfig,
		"--root-dir="+KubeletRootDir,
		"--cert-dir="+KubeletRootDir+"/pki",
		"--hostname-override="+n.cfg.Name,
		"--node-ip="+n.cfg.NodeIP.String(),
		"--v=1",
	)
}

// startProc runs path inside the node's network and mount namespaces. Not
// `ip netns exec`: it remounts /sys, and the kubelet would then find
// /sys/fs/cgroup empty.
func (n *Node) startProc(name, path string, args ...string) error {
	p, err := nsproc.Start(nsproc.Spec{
		Path: "nsenter",
		Args: append([]string{"--mount=" + n.mntnsFile(), "--net=" + namedns.Path(n.cfg.Netns), "--", path}, args...),
		Log:  filepath.Join(n.cfg.LogDir, name+"-"+n.cfg.Name+".log"),
	})
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
	return nil
}

// teardown stops the kubelet, then containerd, kills what they leave
// (shims and containers keep running after containerd exits), removes the
// node's cgroups and releases its mount namespace.
func (n *Node) teardown() error {
	n.mu.Lock()
	procs := n.procs
	n.procs = nil
	n.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].Stop(10 * time.Second)
	}
	return cleanNode(n.mntnsFile(), n.cfg.CgroupRoot)
}

// cleanNode kills every process of a node (by mount namespace and cgroup
// root), removes its cgroups and releases its mount namespace.
func cleanNode(mntnsFile, cgroupRoot string) error {
	var errs []error
	if ino, err := mntnsInode(mntnsFile); err == nil {
		if err := killAll(func() []int { return pidsInMntns(ino) }, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if err := killAll(func() []int { p, _ := cgroupPids(cgroupRoot); return p }, 10*time.Second); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroups(cgroupRoot); err != nil {
		errs = append(errs, err)
	}
	if err := releaseMountNamespace(mntnsFile); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// linkPlugins links every plugin of pluginDir into binDir: containerd 1.6
// takes a single CNI bin dir, which also receives tunmesh-cni from the
// installer.
func linkPlugins(pluginDir, binDir string) error {
	ents, err := os.ReadDir(pluginDir)
	if err != nil {
		return fmt.Errorf("list CNI plugins: %w", err)
	}
	for _, e := range ents {
		dst := filepath.Join(binDir, e.Name())
		if _, err := os.Lstat(dst); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join(pluginDir, e.Name()), dst); err != nil {
			return fmt.Errorf("link CNI plugin %s: %w", e.Name(), err)
		}
	}
	return nil
}

// ArchiveRef returns the image reference an OCI archive written by
// tools/internal/images carries (its io.containerd.image.name annotation).
func ArchiveRef(archive string) (string, error) {
	out, err := exec.Command("tar", "-xOf", archive, "index.json").Output()
	if err != nil {
		return "", fmt.Errorf("read index of %s: %w", archive, err)
	}
	var idx struct {
		Manifests []struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(out, &idx); err != nil {
		return "", fmt.Errorf("parse index of %s: %w", archive, err)
	}
	for _, m := range idx.Manifests {
		if r := m.Annotations["io.containerd.image.name"]; r != "" {
			return r, nil
		}
	}
	return "", fmt.Errorf("image archive %s names no image", archive)
}

func waitFor(ctx context.Context, timeout time.Duration, ok func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for !ok() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// DefaultHostDir holds the machine-wide state of every real-node cluster
// on this machine (on tmpfs: a reboot resets what it records).
const DefaultHostDir = "/run/tunmesh-dev-realnodes"

// Host is the host-wide state the real nodes of every cluster on the
// machine share: the sysctls the kubelet changes (saved before the first
// node of the first cluster starts), the mount points created on the host,
// and the clusters using them. Only the last cluster to go restores the
// sysctls and removes the mount points: removing a directory that is a
// mount point in another cluster's node mount namespace would detach that
// node's bind mount (its containerd would lose its content store). A user
// whose directory no longer exists is dropped (a crashed cluster that was
// swept).
type Host struct {
	dir  string // machine-wide state directory
	user string // this cluster's state directory
	mu   sync.Mutex
}

// NewHost keeps the shared state in dir for the cluster whose state
// directory is user.
func NewHost(dir, user string) *Host { return &Host{dir: dir, user: user} }

func (h *Host) file() string { return filepath.Join(h.dir, "host.json") }

// locked runs fn with the machine-wide lock held and the state loaded; fn
// reports whether to write the state back.
func (h *Host) locked(fn func(st *hostState) (write bool, err error)) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := os.MkdirAll(h.dir, 0o755); err != nil {
		return fmt.Errorf("create host state dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(h.dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("open host state lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock host state: %w", err)
	}
	st, err := readHostState(h.file())
	if err != nil {
		return err
	}
	write, err := fn(&st)
	if err != nil || !write {
		return err
	}
	return writeHostState(h.file(), st)
}

// prepare registers this cluster and saves the sysctls once (the first
// node of the first cluster; later ones keep the original values).
func (h *Host) prepare() error {
	return h.locked(func(st *hostState) (bool, error) {
		if st.Sysctls == nil {
			var err error
			if st.Sysctls, err = ReadSysctls(HostSysctls); err != nil {
				return false, err
			}
		}
		for _, u := range st.Users {
			if u == h.user {
				return true, nil
			}
		}
		st.Users = append(st.Users, h.user)
		return true, nil
	})
}

func (h *Host) recordMountPoint(dir string) error {
	return h.locked(func(st *hostState) (bool, error) {
		for _, d := range st.MountPoints {
			if d == dir {
				return false, nil // another node made it
			}
		}
		st.MountPoints = append(st.MountPoints, dir)
		return true, nil
	})
}

// Restore unregisters this cluster (call it once its nodes are down). The
// last cluster puts the saved sysctls back and removes the mount points
// created on the host (innermost first; only if still empty).
func (h *Host) Restore() error {
	return h.locked(func(st *hostState) (bool, error) {
		var users []string
		for _, u := range st.Users {
			if _, err := os.Stat(u); u != h.user && err == nil {
				users = append(users, u)
			}
		}
		st.Users = users
		if len(users) > 0 {
			return true, nil
		}
		var errs []error
		if st.Sysctls != nil {
			if err := writeSysctls(st.Sysctls); err != nil {
				errs = append(errs, err)
			}
		}
		for i := len(st.MountPoints) - 1; i >= 0; i-- {
			if err := os.Remove(st.MountPoints[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove mount point %s: %w", st.MountPoints[i], err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			return false, err
		}
		if err := os.Remove(h.file()); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("remove host state: %w", err)
		}
		return false, nil
	})
}

// Others lists the other clusters currently registered as using the host.
func (h *Host) Others() ([]string, error) {
	var others []string
	err := h.locked(func(st *hostState) (bool, error) {
		for _, u := range st.Users {
			if _, err := os.Stat(u); u != h.user && err == nil {
				others = append(others, u)
			}
		}
		return false, nil
	})
	return others, err
}

// Sweep cleans up real nodes after a crash: the processes of each node
// whose mount-namespace file is given, the cgroup roots starting with
// cgroupPrefix, the mount namespaces, then the host state (sysctls, mount
// points).
func Sweep(mntnsFiles []string, cgroupPrefix string, host *Host) error {
	var errs []error
	for _, f := range mntnsFiles {
		if ino, err := mntnsInode(f); err == nil {
			if err := killAll(func() []int { return pidsInMntns(ino) }, 10*time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	roots, err := CgroupRoots(cgroupPrefix)
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range roots {
		if err := killAll(func() []int { p, _ := cgroupPids(r); return p }, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
		if err := removeCgroups(r); err != nil {
			errs = append(errs, err)
		}
	}
	for _, f := range mntnsFiles {
		if err := releaseMountNamespace(f); err != nil {
			errs = append(errs, err)
		}
	}
	if err := host.Restore(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
