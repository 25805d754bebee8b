package realnode

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// apply pipes a manifest into kubectl apply.
func apply(t testing.TB, c *e2eenv.Cluster, manifest string) {
	t.Helper()
	cmd := exec.Command(c.KubectlBin, "--kubeconfig", c.State.Kubeconfig, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s\n---\n%s", err, out, manifest)
	}
}

// podNetns returns a path to the network namespace of a running pod: the
// netns link of its container's process. (Pod network namespaces of a
// real node are mounted inside the node's mount namespace only.)
func podNetns(t testing.TB, c *e2eenv.Cluster, p *corev1.Pod) string {
	t.Helper()
	if len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].ContainerID == "" {
		t.Fatalf("pod %s has no running container", p.Name)
	}
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	sock := devcluster.ContainerdSocket(c.Cfg(), p.Spec.NodeName)
	out, err := exec.Command("ctr", "--address", sock, "--namespace", "k8s.io", "tasks", "ls").Output()
	if err != nil {
		t.Fatalf("ctr tasks ls on %s: %v", p.Spec.NodeName, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == id {
			return "/proc/" + f[1] + "/ns/net"
		}
	}
	t.Fatalf("no task for container %s of pod %s on %s", id, p.Name, p.Spec.NodeName)
	return ""
}

// dialFrom opens a TCP connection from inside a network namespace path.
func dialFrom(ctx context.Context, netnsPath, addr string) (net.Conn, error) {
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		return nil, err
	}
	defer target.Close()
	var conn net.Conn
	err = target.Do(func(ns.NetNS) error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return conn, err
}

// transfer sends n pseudo-random bytes from the pod's namespace to an echo
// server at dst, half-closes, and checks the echo byte for byte (SHA-256).
func transfer(t testing.TB, netnsPath, dst string, n int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := dialFrom(ctx, netnsPath, dst)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(io.MultiWriter(conn, sent), 64<<10)
		_, err := io.CopyN(w, rand.NewChaCha8([32]byte{byte(n)}), n)
		if err == nil {
			err = w.Flush()
		}
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got := sha256.New()
	m, err := io.Copy(got, conn)
	if werr := <-errc; werr != nil {
		t.Fatalf("send to %s: %v", dst, werr)
	}
	if err != nil || m != n {
		t.Fatalf("echo from %s: %d bytes, %v; want %d", dst, m, err, n)
	}
	if fmt.Sprintf("%x", sent.Sum(nil)) != fmt.Sprintf("%x", got.Sum(nil)) {
		t.Fatalf("echo from %s differs from what was sent", dst)
	}
}

// kubectl runs kubectl against the cluster and returns its output.
func kubectl(t testing.TB, c *e2eenv.Cluster, args ...string) string {
	t.Helper()
	return c.Kubectl(t, args...)
}

func mustAddr(t testing.TB, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatalf("address %q: %v", s, err)
	}
	return a
}

// transferPayload sends payload to an echo server and checks the echo.
func transferPayload(t testing.TB, netnsPath, dst string, payload []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := dialFrom(ctx, netnsPath, dst)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	go func() {
		_, _ = conn.Write(payload)
		_ = conn.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("echo from %s: %d bytes, %v; want the %d sent", dst, len(got), err, len(payload))
	}
}

// dumpOnFailure logs the cluster's pods and events when t fails.
func dumpOnFailure(t *testing.T, c *e2eenv.Cluster) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, args := range [][]string{
			{"get", "pods", "-A", "-o", "wide"},
			{"get", "events", "-A", "--sort-by=.lastTimestamp"},
			{"-n", "tunmesh", "logs", "-l", "app=tunmesh-node", "-c", "agent", "--tail=40", "--prefix"},
		} {
			out, _ := c.KubectlErr(args...)
			t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
		}
	})
}

// ctl runs tunmeshctl and returns its stdout; commands that talk to the
// cluster (all but uninstall) get its kubeconfig.
func ctl(c *e2eenv.Cluster, args ...string) (string, error) {
	if args[0] != "uninstall" {
		args = append(args, "--kubeconfig", c.State.Kubeconfig)
	}
	cmd := exec.Command(filepath.Join(c.BinDir, "tunmeshctl"), args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%w: %s", err, stderr.String())
	}
	return string(out), nil
}
