// Package e2e runs end-to-end tests against one local cluster (tunmeshctl
// dev up) shared by every test of the package. The binaries under test are
// built from this checkout; clusters of concurrent test runs are serialized
// with a lock file so that go test never starts several at once.
package e2e

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// testRoot holds the state of test clusters, apart from `make demo`'s.
const testRoot = "/var/lib/tunmesh-dev-test"

// env is the shared cluster; nil when the tests cannot run (not root).
var env *cluster

type cluster struct {
	name       string
	binDir     string // tunmeshctl, tunmesh-workload
	kubectlBin string
	state      *devcluster.State
	client     kubernetes.Interface
}

func (c *cluster) cfg() devcluster.Config {
	return devcluster.Config{Name: c.name, Root: testRoot}
}

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipping: the local cluster needs root")
		os.Exit(m.Run()) // every test skips through need()
	}
	code, err := runWithCluster(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func runWithCluster(m *testing.M) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	tmp, err := os.MkdirTemp("", "tunmesh-e2e-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(tmp)
	if err := build(ctx, tmp); err != nil {
		return 1, err
	}
	ctl := filepath.Join(tmp, "tunmeshctl")
	kubeBin, err := output(ctx, ctl, "dev", "kube-build")
	if err != nil {
		return 1, fmt.Errorf("build kubernetes binaries: %w", err)
	}

	unlock, err := lockClusters()
	if err != nil {
		return 1, err
	}
	defer unlock()
	reapStale(ctx, ctl)

	c := &cluster{name: "e2e" + randomSuffix(), binDir: tmp, kubectlBin: filepath.Join(strings.TrimSpace(kubeBin), "kubectl")}
	start := time.Now()
	up := exec.CommandContext(ctx, ctl, "dev", "up", "--nodes", "2", "--name", c.name, "--root", testRoot)
	up.Stdout, up.Stderr = os.Stdout, os.Stderr
	upErr := up.Run()
	fmt.Printf("e2e: cluster %q up in %s\n", c.name, time.Since(start).Round(100*time.Millisecond))
	code := 1
	if upErr == nil {
		if c.state, err = devcluster.ReadState(c.cfg()); err == nil {
			c.client, err = devcluster.Client(c.state)
		}
		if err != nil {
			upErr = err
		}
	}
	if upErr == nil {
		env = c
		code = m.Run()
	}
	// Teardown is itself checked: nothing of the cluster may remain.
	if err := teardown(ctl, c); err != nil {
		return code, err
	}
	if upErr != nil {
		return 1, fmt.Errorf("dev up: %w", upErr)
	}
	return code, nil
}

func build(ctx context.Context, dir string) error {
	gomod, err := output(ctx, "go", "env", "GOMOD")
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./tools/cmd/tunmeshctl", "./tools/cmd/tunmesh-workload", "./identity/cmd/tunmesh-identity")
	cmd.Dir = filepath.Dir(strings.TrimSpace(gomod))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build binaries: %w\n%s", err, out)
	}
	return nil
}

// teardown runs `dev down` and proves that no namespace, state directory or
// process of the cluster is left.
func teardown(ctl string, c *cluster) error {
	down := exec.Command(ctl, "dev", "down", "--name", c.name, "--root", testRoot)
	down.Stdout, down.Stderr = os.Stdout, os.Stderr
	if err := down.Run(); err != nil {
		return fmt.Errorf("dev down: %w", err)
	}
	left, err := devcluster.Leftovers(c.cfg())
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("left behind after dev down: %v", left)
	}
	if pids := processesMentioning(c.name); len(pids) > 0 {
		return fmt.Errorf("processes left behind after dev down: %v", pids)
	}
	names, _ := namedns.List(c.name)
	if len(names) > 0 {
		return fmt.Errorf("namespaces left behind: %v", names)
	}
	return nil
}

// processesMentioning returns live (non-zombie) processes whose command
// line contains s.
func processesMentioning(s string) []string {
	procs, _ := os.ReadDir("/proc")
	var found []string
	for _, p := range procs {
		cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 { // gone, kernel thread or zombie
			continue
		}
		line := strings.ReplaceAll(string(cmdline), "\x00", " ")
		if strings.Contains(line, s) {
			found = append(found, p.Name()+": "+line)
		}
	}
	return found
}

// lockClusters serializes test clusters across packages and runs.
func lockClusters() (func(), error) {
	if err := os.MkdirAll(testRoot, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(testRoot, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock test clusters: %w", err)
	}
	return func() { f.Close() }, nil
}

// reapStale removes clusters a killed test run left in the test root (we
// hold the lock, so none of them is in use).
func reapStale(ctx context.Context, ctl string) {
	ents, _ := os.ReadDir(testRoot)
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		fmt.Printf("e2e: removing stale test cluster %q\n", e.Name())
		_ = exec.CommandContext(ctx, ctl, "dev", "down", "--name", e.Name(), "--root", testRoot).Run()
	}
}

func randomSuffix() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

func output(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// need returns the shared cluster or skips the test.
func need(t testing.TB) *cluster {
	t.Helper()
	if env == nil {
		t.Skip("needs root and a local cluster (see TestMain output)")
	}
	return env
}
