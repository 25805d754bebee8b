// Package e2eenv runs one local cluster (tunmeshctl dev up) for the
// end-to-end tests of a package, shared by all of them: Main builds the
// binaries under test from this checkout, brings the cluster up, runs the
// tests, tears it down and proves nothing is left. Clusters of concurrent
// test runs are serialized with a lock file so that go test never starts
// several at once.
package e2eenv

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// TestRoot holds the state of test clusters, apart from `make demo`'s.
const TestRoot = "/var/lib/tunmesh-dev-test"

// current is the shared cluster; nil when the tests cannot run (not root).
var current *Cluster

type Cluster struct {
	RealNodes  bool // real kubelets + containerd (Options.RealNodes)
	Name       string
	BinDir     string // tunmeshctl, tunmesh-workload
	KubectlBin string
	State      *devcluster.State
	Client     kubernetes.Interface
}

func (c *Cluster) Cfg() devcluster.Config {
	return devcluster.Config{Name: c.Name, Root: TestRoot}
}

// Options shape the shared cluster.
type Options struct {
	// Mesh runs tunmesh on the cluster (dev up --mesh).
	Mesh bool
	// RealNodes runs real kubelets with containerd (dev up --real-nodes)
	// with tunmesh's images built from this checkout imported; tunmesh is
	// then installed by the tests, as a user would.
	RealNodes bool
	// UpArgs are more arguments of dev up (e.g. --transport wireguard).
	UpArgs []string
}

// Current is the shared cluster; nil when the tests cannot run (not root).
func Current() *Cluster { return current }

// Main is a package's TestMain: it runs the tests against a shared local
// cluster and exits.
func Main(m *testing.M, opts Options) {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipping: the local cluster needs root")
		os.Exit(m.Run()) // every test skips through Need()
	}
	code, err := runWithCluster(m, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func runWithCluster(m *testing.M, opts Options) (int, error) {
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
	if opts.RealNodes {
		start := time.Now()
		if err := buildImages(ctx, tmp); err != nil {
			return 1, err
		}
		fmt.Printf("e2e: images built in %s\n", time.Since(start).Round(100*time.Millisecond))
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

	c := &Cluster{Name: "e2e" + RandomSuffix(), BinDir: tmp, KubectlBin: filepath.Join(strings.TrimSpace(kubeBin), "kubectl"), RealNodes: opts.RealNodes}
	before, err := snapshotHost()
	if err != nil {
		return 1, err
	}
	start := time.Now()
	up := exec.CommandContext(ctx, ctl, "dev", "up", "--nodes", "2", "--name", c.Name, "--root", TestRoot, "--mesh="+strconv.FormatBool(opts.Mesh), "--real-nodes="+strconv.FormatBool(opts.RealNodes))
	up.Args = append(up.Args, opts.UpArgs...)
	up.Stdout, up.Stderr = os.Stdout, os.Stderr
	upErr := up.Run()
	fmt.Printf("e2e: cluster %q up in %s\n", c.Name, time.Since(start).Round(100*time.Millisecond))
	code := 1
	if upErr == nil {
		if c.State, err = devcluster.ReadState(c.Cfg()); err == nil {
			c.Client, err = devcluster.Client(c.State)
		}
		if err != nil {
			upErr = err
		}
	}
	if upErr == nil {
		current = c
		code = m.Run()
	}
	// Teardown is itself checked: nothing of the cluster may remain.
	before.recordNodes(c)
	if err := teardown(ctl, c); err != nil {
		return code, err
	}
	if err := before.unchanged(c.Name); err != nil {
		return code, fmt.Errorf("after dev down: %w", err)
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
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./tools/cmd/tunmeshctl", "./tools/cmd/tunmesh-workload", "./identity/cmd/tunmesh-identity", "./node/cmd/tunmesh-node", "./cni/cmd/tunmesh-cni", "./cni/cmd/tunmesh-cni-install", "./tools/cmd/tunmesh-images")
	cmd.Dir = filepath.Dir(strings.TrimSpace(gomod))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build binaries: %w\n%s", err, out)
	}
	return nil
}

// teardown runs `dev down` and proves that no namespace, state directory or
// process of the cluster is left.
func teardown(ctl string, c *Cluster) error {
	down := exec.Command(ctl, "dev", "down", "--name", c.Name, "--root", TestRoot)
	down.Stdout, down.Stderr = os.Stdout, os.Stderr
	if err := down.Run(); err != nil {
		return fmt.Errorf("dev down: %w", err)
	}
	left, err := devcluster.Leftovers(c.Cfg())
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("left behind after dev down: %v", left)
	}
	if pids := processesMentioning(c.Name); len(pids) > 0 {
		return fmt.Errorf("processes left behind after dev down: %v", pids)
	}
	names, _ := namedns.List(c.Name)
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
	if err := os.MkdirAll(TestRoot, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(TestRoot, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
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
	ents, _ := os.ReadDir(TestRoot)
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		fmt.Printf("e2e: removing stale test cluster %q\n", e.Name())
		_ = exec.CommandContext(ctx, ctl, "dev", "down", "--name", e.Name(), "--root", TestRoot).Run()
	}
}

func RandomSuffix() string {
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

// Need returns the shared cluster or skips the test.
func Need(t testing.TB) *Cluster {
	t.Helper()
	if current == nil {
		t.Skip("needs root and a local cluster (see TestMain output)")
	}
	return current
}

// kubectl runs the cluster's kubectl and fails the test on error.
func (c *Cluster) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.KubectlErr(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *Cluster) KubectlErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.KubectlBin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.State.Kubeconfig)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// ctl runs tunmeshctl against the shared cluster and returns its combined
// output and exit error.
func (c *Cluster) Ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	full := append([]string{args[0], args[1], "--name", c.Name, "--root", TestRoot}, args[2:]...)
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "tunmeshctl"), full...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// workload is the path of tunmesh-workload, usable inside pod namespaces
// (they share the host's filesystem).
func (c *Cluster) Workload() string { return filepath.Join(c.BinDir, "tunmesh-workload") }

// inPod runs argv in the pod's network namespace through `dev exec`.
func (c *Cluster) InPod(ns, pod string, argv ...string) (string, error) {
	return c.Ctl(append([]string{"dev", "exec", pod, "-n", ns, "--"}, argv...)...)
}

// WaitFor polls try until it returns nil or the timeout passes.
func WaitFor(t testing.TB, timeout time.Duration, what string, try func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = try(); err == nil {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
}

func (c *Cluster) Pods(t testing.TB, ns, selector string) []corev1.Pod {
	t.Helper()
	list, err := c.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatalf("list pods %s in %s: %v", selector, ns, err)
	}
	return list.Items
}

func (c *Cluster) Pod(t testing.TB, ns, name string) *corev1.Pod {
	t.Helper()
	p, err := c.Client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	return p
}

func (c *Cluster) PodCIDR(t testing.TB, node string) netip.Prefix {
	t.Helper()
	for _, n := range c.State.Nodes {
		if n.Name == node {
			return netip.MustParsePrefix(n.PodCIDR)
		}
	}
	t.Fatalf("no node %q in cluster state", node)
	return netip.Prefix{}
}

func (c *Cluster) PodNetns(p *corev1.Pod) string {
	return c.Cfg().PodNetnsPrefix() + string(p.UID)
}

func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// namespace creates a namespace for one test and deletes it afterwards.
func (c *Cluster) Namespace(t testing.TB, name string) string {
	t.Helper()
	_, err := c.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = c.Client.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	// Pods need the namespace's default ServiceAccount (made by the controller).
	WaitFor(t, 30*time.Second, "default service account in "+name, func() error {
		_, err := c.Client.CoreV1().ServiceAccounts(name).Get(context.Background(), "default", metav1.GetOptions{})
		return err
	})
	return name
}

// Impersonating returns a client that acts as user (with its RBAC).
func (c *Cluster) Impersonating(user string) (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", c.State.Kubeconfig)
	if err != nil {
		return nil, err
	}
	rc.Impersonate.UserName = user
	rc.QPS, rc.Burst = 50, 100 // as tunmesh-identity's main sets
	return kubernetes.NewForConfig(rc)
}
