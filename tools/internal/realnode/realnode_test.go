package realnode

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/tunmesh/tunmesh/tools/internal/images"
)

func TestKubeletConfig(t *testing.T) {
	y, err := KubeletConfig(netip.MustParseAddr("10.250.0.11"), "/tunmesh-x-node-1", "/pki/ca.crt")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal([]byte(y), &m); err != nil {
		t.Fatalf("not YAML: %v\n%s", err, y)
	}
	want := map[string]any{
		"kind":                     "KubeletConfiguration",
		"address":                  "10.250.0.11",
		"cgroupRoot":               "/tunmesh-x-node-1",
		"cgroupDriver":             "cgroupfs",
		"failCgroupV1":             false,
		"failSwapOn":               false,
		"readOnlyPort":             float64(0),
		"containerRuntimeEndpoint": "unix://" + ContainerdSocket,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	authn, _ := m["authentication"].(map[string]any)
	anon, _ := authn["anonymous"].(map[string]any)
	x509, _ := authn["x509"].(map[string]any)
	if anon["enabled"] != false || x509["clientCAFile"] != "/pki/ca.crt" {
		t.Errorf("authentication = %v: want anonymous off and the cluster CA", authn)
	}
	if authz, _ := m["authorization"].(map[string]any); authz["mode"] != "Webhook" {
		t.Errorf("authorization = %v, want Webhook", authz)
	}
	if ev, ok := m["evictionHard"].(map[string]any); !ok || len(ev) != 0 {
		t.Errorf("evictionHard = %v, want empty (no eviction)", m["evictionHard"])
	}
	for _, bad := range []struct {
		addr       netip.Addr
		root, ca   string
		whatsWrong string
	}{
		{netip.Addr{}, "/r", "/ca", "no address"},
		{netip.MustParseAddr("10.0.0.1"), "", "/ca", "no cgroup root"},
		{netip.MustParseAddr("10.0.0.1"), "/r", "", "no CA"},
	} {
		if _, err := KubeletConfig(bad.addr, bad.root, bad.ca); err == nil {
			t.Errorf("%s: no error", bad.whatsWrong)
		}
	}
}

func TestContainerdConfig(t *testing.T) {
	c, err := ContainerdConfig("ghcr.io/tunmesh/tunmesh-pause:dev")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		`version = 2`,
		`address = "/run/containerd/containerd.sock"`,
		`sandbox_image = "ghcr.io/tunmesh/tunmesh-pause:dev"`,
		`restrict_oom_score_adj = true`,
		`netns_mounts_under_state_dir = true`,
		`enable_unprivileged_ports = true`,
		`snapshotter = "overlayfs"`,
		`SystemdCgroup = false`,
		`bin_dir = "/opt/cni/bin"`,
		`conf_dir = "/etc/cni/net.d"`,
		`"io.containerd.internal.v1.opt"`,
	} {
		if !strings.Contains(c, line) {
			t.Errorf("containerd config lacks %s", line)
		}
	}
	if _, err := ContainerdConfig(""); err == nil {
		t.Error("no sandbox image: no error")
	}
}

// Every per-node path a DaemonSet mounts is one the node binds.
func TestMountsCoverDaemonSetPaths(t *testing.T) {
	have := map[string]bool{}
	for _, m := range Mounts {
		have[m] = true
	}
	for _, p := range []string{CNIConfDir, CNIBinDir, "/run/tunmesh", "/var/lib/tunmesh", "/run/containerd", KubeletRootDir, "/var/lib/cni", "/var/log/pods"} {
		if !have[p] {
			t.Errorf("%s is not bound per node", p)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{
		Name: "node-1", Netns: "x-node-1", NodeIP: netip.MustParseAddr("10.250.0.11"), Dir: "/d", CNIConfDir: "/c",
		CNIBinDir: "/b", PluginDir: "/p", KubeBinDir: "/k", Kubeconfig: "/kc", ClientCA: "/ca",
		Images: []string{"/i.tar"}, CgroupRoot: "/tunmesh-x-node-1", LogDir: "/l", Log: slog.Default(),
	}
	if err := ok.validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, mut := range map[string]func(*Config){
		"nested cgroup root": func(c *Config) { c.CgroupRoot = "/a/b" },
		"relative root":      func(c *Config) { c.CgroupRoot = "a" },
		"bare slash":         func(c *Config) { c.CgroupRoot = "/" },
		"no images":          func(c *Config) { c.Images = nil },
		"no logger":          func(c *Config) { c.Log = nil },
		"no node IP":         func(c *Config) { c.NodeIP = netip.Addr{} },
		"no kubeconfig":      func(c *Config) { c.Kubeconfig = "" },
	} {
		c := ok
		mut(&c)
		if err := c.validate(); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestArchiveRef(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "pause")
	if err := os.WriteFile(bin, []byte("x"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := images.Build(images.Spec{Name: "tunmesh-pause", Files: []images.File{{Path: "/pause", Source: bin}}, Entrypoint: []string{"/pause"}})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := images.WriteArchive(&buf, img, "example.test/tunmesh-pause:t1"); err != nil {
		t.Fatal(err)
	}
	a := filepath.Join(dir, "pause.tar")
	if err := os.WriteFile(a, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	ref, err := ArchiveRef(a)
	if err != nil || ref != "example.test/tunmesh-pause:t1" {
		t.Fatalf("ArchiveRef = %q, %v", ref, err)
	}
	if _, err := ArchiveRef(bin); err == nil {
		t.Error("not an archive: no error")
	}
}

func TestLinkPlugins(t *testing.T) {
	plugins, bin := t.TempDir(), t.TempDir()
	for _, p := range []string{"bridge", "host-local"} {
		if err := os.WriteFile(filepath.Join(plugins, p), nil, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A binary the installer put there stays.
	if err := os.WriteFile(filepath.Join(bin, "tunmesh-cni"), []byte("mine"), 0o755); err != nil {
		t.Fatal(err)
	}
	for range 2 { // idempotent
		if err := linkPlugins(plugins, bin); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"bridge", "host-local"} {
		if dst, err := os.Readlink(filepath.Join(bin, p)); err != nil || dst != filepath.Join(plugins, p) {
			t.Errorf("%s -> %q, %v", p, dst, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(bin, "tunmesh-cni")); string(b) != "mine" {
		t.Error("existing binary replaced")
	}
}

// Host.Restore writes back the saved sysctls and removes exactly the
// mount points it recorded, innermost first.
func TestHostRestore(t *testing.T) {
	old := ProcSys
	ProcSys = t.TempDir()
	t.Cleanup(func() { ProcSys = old })
	for _, k := range HostSysctls {
		p := sysctlPath(k)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	h := NewHost(filepath.Join(root, "state"), root)
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	var created []string
	rec := func(d string) error { created = append(created, d); return h.recordMountPoint(d) }
	if err := mkdirRecorded(filepath.Join(root, "opt", "cni", "bin"), rec); err != nil {
		t.Fatal(err)
	}
	if err := mkdirRecorded(filepath.Join(root, "opt", "cni", "bin"), rec); err != nil {
		t.Fatal(err)
	}
	if len(created) != 3 {
		t.Fatalf("recorded %v, want opt, opt/cni, opt/cni/bin once each", created)
	}
	// The kubelet changes the sysctls; a second prepare keeps the originals.
	for _, k := range HostSysctls {
		if err := os.WriteFile(sysctlPath(k), []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	if err := h.Restore(); err != nil {
		t.Fatal(err)
	}
	got, err := ReadSysctls(HostSysctls)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range got {
		if v != "0" {
			t.Errorf("%s = %s after restore, want 0", k, v)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "opt")); !os.IsNotExist(err) {
		t.Errorf("created mount points not removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "state", "host.json")); !os.IsNotExist(err) {
		t.Errorf("host state file left: %v", err)
	}
}

// Two clusters share the host: the first to go leaves the sysctls and the
// mount points alone (removing a mount point detaches the other cluster's
// binds); the last restores them. A user whose directory is gone does not
// count.
func TestHostSharedByClusters(t *testing.T) {
	old := ProcSys
	ProcSys = t.TempDir()
	t.Cleanup(func() { ProcSys = old })
	for _, k := range HostSysctls {
		p := sysctlPath(k)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("0"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	state, a, b, gone := t.TempDir(), t.TempDir(), t.TempDir(), filepath.Join(t.TempDir(), "gone")
	ha, hb, hgone := NewHost(state, a), NewHost(state, b), NewHost(state, gone)
	for _, h := range []*Host{ha, hb, hgone} {
		if err := h.prepare(); err != nil {
			t.Fatal(err)
		}
	}
	mp := filepath.Join(t.TempDir(), "var-lib-kubelet")
	if err := mkdirRecorded(mp, ha.recordMountPoint); err != nil {
		t.Fatal(err)
	}
	for _, k := range HostSysctls {
		if err := os.WriteFile(sysctlPath(k), []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if others, err := ha.Others(); err != nil || len(others) != 1 || others[0] != b {
		t.Fatalf("others of a = %v, %v; want [b] (gone does not count)", others, err)
	}
	if err := ha.Restore(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mp); err != nil {
		t.Errorf("mount point removed while cluster b still uses it: %v", err)
	}
	if v, _ := ReadSysctls(HostSysctls); v["kernel.panic"] != "1" {
		t.Errorf("sysctls restored while cluster b still runs: %v", v)
	}
	if err := hb.Restore(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mp); !os.IsNotExist(err) {
		t.Errorf("last cluster left the mount point: %v", err)
	}
	if v, _ := ReadSysctls(HostSysctls); v["kernel.panic"] != "0" {
		t.Errorf("last cluster did not restore the sysctls: %v", v)
	}
}

// removeCgroups removes a tree deepest first; on a plain directory tree
// (no cgroupfs) rmdir behaves the same for empty directories.
func TestRemoveCgroups(t *testing.T) {
	old := CgroupFS
	CgroupFS = t.TempDir()
	t.Cleanup(func() { CgroupFS = old })
	for _, h := range []string{"memory", "cpuset", "unified"} {
		if err := os.MkdirAll(filepath.Join(CgroupFS, h, "tunmesh-x-node-1", "kubepods", "besteffort", "pod1"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("memory", filepath.Join(CgroupFS, "mem")); err != nil {
		t.Fatal(err)
	}
	roots, err := CgroupRoots("tunmesh-x-")
	if err != nil || len(roots) != 1 || roots[0] != "/tunmesh-x-node-1" {
		t.Fatalf("CgroupRoots = %v, %v", roots, err)
	}
	if err := removeCgroups("/tunmesh-x-node-1"); err != nil {
		t.Fatal(err)
	}
	if roots, _ := CgroupRoots("tunmesh-x-"); len(roots) != 0 {
		t.Errorf("left: %v", roots)
	}
}

// A node mount namespace binds a directory over a path for its processes
// only; releasing it leaves the host as it was.
func TestMountNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mount namespaces)")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare")
	}
	dir := t.TempDir()
	src, target := filepath.Join(dir, "src"), filepath.Join(dir, "target")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "marker"), []byte("node"), 0o644); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "mntns")
	var created []string
	err := newMountNamespace(file, map[string]string{target: src}, func(d string) error { created = append(created, d); return nil })
	t.Cleanup(func() { _ = releaseMountNamespace(file) })
	if err != nil {
		t.Fatal(err)
	}
	if len(created) != 1 || created[0] != target {
		t.Errorf("created %v, want [%s]", created, target)
	}
	out, err := exec.Command("nsenter", "--mount="+file, "--", "cat", filepath.Join(target, "marker")).CombinedOutput()
	if err != nil || string(out) != "node" {
		t.Errorf("inside the node: %q, %v", out, err)
	}
	if _, err := os.Stat(filepath.Join(target, "marker")); !os.IsNotExist(err) {
		t.Errorf("the bind leaked to the host: %v", err)
	}
	prop, err := exec.Command("nsenter", "--mount="+file, "--", "findmnt", "-n", "-o", "PROPAGATION", "/").Output()
	if err != nil || strings.TrimSpace(string(prop)) != "shared" {
		t.Errorf("node root propagation %q, %v; want shared", prop, err)
	}
	if err := releaseMountNamespace(file); err != nil {
		t.Fatal(err)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), file) {
		t.Error("namespace file still mounted")
	}
}
