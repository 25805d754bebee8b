package e2eenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/images"
	"github.com/tunmesh/tunmesh/tools/internal/realnode"
)

// ImageRegistry and ImageTag name the images the suites build and the
// real nodes import.
const (
	ImageRegistry = images.DefaultRegistry
	ImageTag      = "e2e"
)

// buildImages writes the OCI archives of this checkout into dir/images
// (where dev up --real-nodes looks by default: next to tunmeshctl).
func buildImages(ctx context.Context, dir string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(dir, "tunmesh-images"), "-o", filepath.Join(dir, "images"), "--tag", ImageTag)
	if gomod, err := output(ctx, "go", "env", "GOMOD"); err == nil {
		cmd.Args = append(cmd.Args, "--module-dir", filepath.Dir(strings.TrimSpace(gomod)))
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build images: %w\n%s", err, out)
	}
	return nil
}

// hostSnapshot is what a real node could change on the host, taken before
// the cluster starts: after dev down it must be the same.
type hostSnapshot struct {
	sysctls map[string]string
	absent  []string // mount points real nodes bind, missing before
	// mntns are the inodes of the cluster's node mount namespaces, read
	// just before dev down: no process may be left in them (containerd,
	// kubelet, containerd-shim). Containers are checked by cgroup.
	mntns map[uint64]string
}

func snapshotHost() (*hostSnapshot, error) {
	s := &hostSnapshot{mntns: map[uint64]string{}}
	var err error
	if s.sysctls, err = realnode.ReadSysctls(realnode.HostSysctls); err != nil {
		return nil, err
	}
	for _, m := range realnode.Mounts {
		if _, err := os.Lstat(m); errors.Is(err, os.ErrNotExist) {
			s.absent = append(s.absent, m)
		}
	}
	return s, nil
}

// recordNodes notes the running cluster's node mount namespaces.
func (s *hostSnapshot) recordNodes(c *Cluster) {
	files, _ := filepath.Glob(filepath.Join(c.Cfg().Dir(), "nodes", "*", "real", "mntns"))
	for _, f := range files {
		var st unix.Stat_t
		if unix.Stat(f, &st) == nil {
			s.mntns[st.Ino] = f
		}
	}
}

// otherRealClusters lists supervisors of real-node clusters other than
// cluster: their nodes bind the same host paths, so those cannot be
// checked while they run.
func otherRealClusters(cluster string) []string {
	var found []string
	for _, p := range processesMentioning("--real-nodes=true") {
		if strings.Contains(p, " supervise ") && !strings.Contains(p, "--name "+cluster+" ") {
			found = append(found, p)
		}
	}
	return found
}

// unchanged reports what differs from the snapshot: sysctls the kubelet
// changed, host paths created, shims or cgroups left.
func (s *hostSnapshot) unchanged(cluster string) error {
	var errs []error
	// While another real-node cluster runs, the host's sysctls and mount
	// points are its as well (the last cluster restores them).
	others, err := realnode.NewHost(realnode.DefaultHostDir, "").Others()
	if err != nil {
		return err
	}
	others = append(others, otherRealClusters(cluster)...)
	if len(others) == 0 {
		now, err := realnode.ReadSysctls(realnode.HostSysctls)
		if err != nil {
			return err
		}
		for k, v := range s.sysctls {
			if now[k] != v {
				errs = append(errs, fmt.Errorf("sysctl %s is %s, was %s", k, now[k], v))
			}
		}
		for _, m := range s.absent {
			if _, err := os.Lstat(m); err == nil {
				errs = append(errs, fmt.Errorf("host path %s left behind", m))
			}
		}
	} else {
		fmt.Printf("e2e: host sysctls and paths not checked: another real-node cluster runs (%s)\n", others[0])
	}
	// Killed processes are reparented to PID 1 and gone once it reaps them.
	var left []string
	for try := 0; try < 50; try++ {
		left = left[:0]
		for _, p := range livePids() {
			var st unix.Stat_t
			if unix.Stat("/proc/"+strconv.Itoa(p)+"/ns/mnt", &st) != nil {
				continue
			}
			if f, ok := s.mntns[st.Ino]; ok {
				comm, _ := os.ReadFile("/proc/" + strconv.Itoa(p) + "/comm")
				left = append(left, fmt.Sprintf("%d (%s) in %s", p, strings.TrimSpace(string(comm)), f))
			}
		}
		if len(left) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range left {
		errs = append(errs, fmt.Errorf("process %s left running", p))
	}
	if roots, err := realnode.CgroupRoots("tunmesh-" + cluster + "-"); err == nil && len(roots) > 0 {
		errs = append(errs, fmt.Errorf("cgroups left behind: %v", roots))
	}
	return errors.Join(errs...)
}

// livePids lists the processes that are not zombies.
func livePids() []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		// /proc/<pid>/stat: "pid (comm) state ..."; zombies (Z) hold
		// nothing but their pid until reaped.
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		closing := strings.LastIndexByte(string(stat), ')')
		if closing < 0 || closing+2 >= len(stat) || stat[closing+2] == 'Z' {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// Image is the reference of one of tunmesh's images as the suites built it.
func Image(name string) string { return images.Ref(ImageRegistry, name, ImageTag) }

// TagImage gives an imported image a second reference on every real node
// (a "new version" for rollout tests, without rebuilding).
func (c *Cluster) TagImage(t testing.TB, src, dst string) {
	t.Helper()
	for _, n := range c.State.Nodes {
		sock := devcluster.ContainerdSocket(c.Cfg(), n.Name)
		out, err := exec.Command("ctr", "--address", sock, "--namespace", "k8s.io", "images", "tag", "--force", src, dst).CombinedOutput()
		if err != nil {
			t.Fatalf("tag %s as %s on %s: %v: %s", src, dst, n.Name, err, out)
		}
	}
}
