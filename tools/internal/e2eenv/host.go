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
	absent  []string     // mount points real nodes bind, missing before
	shims   map[int]bool // containerd-shim processes that already ran
}

func snapshotHost() (*hostSnapshot, error) {
	s := &hostSnapshot{shims: map[int]bool{}}
	var err error
	if s.sysctls, err = realnode.ReadSysctls(realnode.HostSysctls); err != nil {
		return nil, err
	}
	for _, m := range realnode.Mounts {
		if _, err := os.Lstat(m); errors.Is(err, os.ErrNotExist) {
			s.absent = append(s.absent, m)
		}
	}
	for _, p := range shimPids() {
		s.shims[p] = true
	}
	return s, nil
}

// unchanged reports what differs from the snapshot: sysctls the kubelet
// changed, host paths created, shims or cgroups left.
func (s *hostSnapshot) unchanged(cluster string) error {
	var errs []error
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
	// Killed shims are reparented to PID 1 and gone once it reaps them.
	var left []int
	for try := 0; try < 50; try++ {
		left = left[:0]
		for _, p := range shimPids() {
			if !s.shims[p] {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range left {
		errs = append(errs, fmt.Errorf("containerd shim %d left running", p))
	}
	if roots, err := realnode.CgroupRoots("tunmesh-" + cluster + "-"); err == nil && len(roots) > 0 {
		errs = append(errs, fmt.Errorf("cgroups left behind: %v", roots))
	}
	return errors.Join(errs...)
}

func shimPids() []int {
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
		open, closing := strings.IndexByte(string(stat), '('), strings.LastIndexByte(string(stat), ')')
		if open < 0 || closing < open || closing+2 >= len(stat) {
			continue
		}
		comm, state := string(stat[open+1:closing]), stat[closing+2]
		if strings.HasPrefix(comm, "containerd-shim") && state != 'Z' {
			pids = append(pids, pid)
		}
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
