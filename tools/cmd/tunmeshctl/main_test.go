package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
)

// recorder stands in for the dev operations and records what each was
// asked to do, so that the tests check command-line parsing only.
type recorder struct {
	called  string
	cfg     devcluster.Config
	cache   string
	exec    devExecArgs
	execErr error
}

func (r *recorder) ops() ops {
	return ops{
		devUp: func(_ context.Context, d *devFlags, _ io.Writer) error {
			r.called, r.cfg, r.cache = "up", d.cfg, d.cacheDir
			return nil
		},
		devSupervise: func(_ context.Context, cfg devcluster.Config, _ *slog.Logger) error {
			r.called, r.cfg = "supervise", cfg
			return nil
		},
		devDown: func(cfg devcluster.Config, _ io.Writer) error {
			r.called, r.cfg = "down", cfg
			return nil
		},
		devStatus: func(_ context.Context, cfg devcluster.Config, _ io.Writer) error {
			r.called, r.cfg = "status", cfg
			return nil
		},
		devKubecfg: func(cfg devcluster.Config, _ io.Writer) error {
			r.called, r.cfg = "kubeconfig", cfg
			return nil
		},
		kubeBuild: func(_ context.Context, cacheDir string, _, _ io.Writer) error {
			r.called, r.cache = "kube-build", cacheDir
			return nil
		},
		devExec: func(_ context.Context, cfg devcluster.Config, e devExecArgs, _ genericiooptions.IOStreams) error {
			r.called, r.cfg, r.exec = "exec", cfg, e
			return r.execErr
		},
	}
}

// runWith runs a command line against a recorder and returns the exit
// code and both outputs.
func runWith(t *testing.T, r *recorder, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	streams := genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut}
	root := newRootCmd(streams, r.ops())
	root.SetArgs(args)
	code := exitCode(root.ExecuteContext(context.Background()), streams, root, args)
	return code, out.String(), errOut.String()
}

func TestDevCommandLines(t *testing.T) {
	t.Setenv("TUNMESH_DEV_NAME", "")
	t.Setenv("TUNMESH_DEV_ROOT", "")
	tests := []struct {
		args     []string
		called   string
		nodes    int
		mesh     bool
		name     string
		root     string
		exec     devExecArgs
		kubeBins string
	}{
		// What the e2e harness runs.
		{args: []string{"dev", "up", "--nodes", "2", "--name", "e2e-1", "--root", "/tmp/r", "--mesh=false"}, called: "up", nodes: 2, mesh: false, name: "e2e-1", root: "/tmp/r"},
		{args: []string{"dev", "up", "--nodes", "2", "--name", "e2e-1", "--root", "/tmp/r", "--mesh=true"}, called: "up", nodes: 2, mesh: true, name: "e2e-1", root: "/tmp/r"},
		{args: []string{"dev", "up", "--name", "inst", "--no-mesh"}, called: "up", nodes: 2, mesh: false, name: "inst", root: devcluster.DefaultRoot},
		{args: []string{"dev", "up"}, called: "up", nodes: 2, mesh: true, name: devcluster.DefaultName, root: devcluster.DefaultRoot},
		// What dev up starts (devcluster.startSupervisor).
		{args: []string{"dev", "supervise", "--name", "x", "--nodes", "3", "--root", "/r", "--kube-bin-dir", "/k", "--bin-dir", "/b", "--cni-bin-dir", "/c", "--etcd", "/e", "--mesh=false"},
			called: "supervise", nodes: 3, mesh: false, name: "x", root: "/r", kubeBins: "/k"},
		{args: []string{"dev", "down", "--name", "e2e-1", "--root", "/tmp/r"}, called: "down", name: "e2e-1", root: "/tmp/r"},
		{args: []string{"dev", "status", "--name", "n"}, called: "status", name: "n", root: devcluster.DefaultRoot},
		{args: []string{"dev", "kubeconfig"}, called: "kubeconfig", name: devcluster.DefaultName, root: devcluster.DefaultRoot},
		{args: []string{"dev", "exec", "client", "-n", "demo", "--", "curl", "-s", "-n", "x"}, called: "exec", name: devcluster.DefaultName, root: devcluster.DefaultRoot,
			exec: devExecArgs{pods: []string{"client"}, namespace: "demo", argv: []string{"curl", "-s", "-n", "x"}}},
		{args: []string{"dev", "exec", "-n", "demo", "client", "--name", "c", "--", "true"}, called: "exec", name: "c", root: devcluster.DefaultRoot,
			exec: devExecArgs{pods: []string{"client"}, namespace: "demo", argv: []string{"true"}}},
		{args: []string{"dev", "exec", "--node", "node-1", "--", "ip", "route"}, called: "exec", name: devcluster.DefaultName, root: devcluster.DefaultRoot,
			exec: devExecArgs{pods: []string{}, namespace: "default", node: "node-1", argv: []string{"ip", "route"}}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := &recorder{}
			code, _, stderr := runWith(t, r, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if r.called != tt.called {
				t.Fatalf("called %q, want %q", r.called, tt.called)
			}
			if r.cfg.Name != tt.name || r.cfg.Root != tt.root {
				t.Errorf("name, root = %q, %q; want %q, %q", r.cfg.Name, r.cfg.Root, tt.name, tt.root)
			}
			if tt.called == "up" || tt.called == "supervise" {
				if r.cfg.Nodes != tt.nodes || r.cfg.Mesh != tt.mesh {
					t.Errorf("nodes, mesh = %d, %v; want %d, %v", r.cfg.Nodes, r.cfg.Mesh, tt.nodes, tt.mesh)
				}
			}
			if tt.kubeBins != "" && (r.cfg.KubeBinDir != tt.kubeBins || r.cfg.BinDir != "/b" || r.cfg.CNIBinDir != "/c" || r.cfg.Etcd != "/e") {
				t.Errorf("supervisor paths not passed through: %+v", r.cfg)
			}
			if tt.called == "exec" && !reflect.DeepEqual(r.exec, tt.exec) {
				t.Errorf("exec = %+v, want %+v", r.exec, tt.exec)
			}
		})
	}
}

// TestUsageErrors: malformed command lines exit 2 and say why, as before
// the move to cobra.
func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{nil, "no command given"},
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"dev"}, "no command given"},
		{[]string{"dev", "bogus"}, `unknown command "bogus"`},
		{[]string{"dev", "up", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"dev", "up", "extra"}, "unknown command"},
		{[]string{"dev", "exec", "pod"}, "no command given"},
		{[]string{"dev", "exec", "pod", "--"}, "no command given"},
		{[]string{"dev", "exec", "a", "b", "--", "true"}, "unexpected arguments"},
		{[]string{"identity", "inspect"}, "accepts 1 arg"},
		{[]string{"check", "-o", "xml"}, `--output "xml"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := &recorder{}
			code, _, stderr := runWith(t, r, tt.args...)
			if code != 2 {
				t.Errorf("exit %d, want 2 (stderr %q)", code, stderr)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q does not say %q", stderr, tt.want)
			}
			if r.called != "" {
				t.Errorf("%s ran on a usage error", r.called)
			}
		})
	}
}

// TestExecExitCode: dev exec exits with the command's own exit code.
func TestExecExitCode(t *testing.T) {
	r := &recorder{execErr: exitError{5}}
	code, _, stderr := runWith(t, r, "dev", "exec", "--node", "node-1", "--", "sh", "-c", "exit 5")
	if code != 5 || stderr != "" {
		t.Errorf("exit %d, stderr %q; want 5 and nothing printed", code, stderr)
	}
}

func TestHelpAndCompletion(t *testing.T) {
	code, out, _ := runWith(t, &recorder{}, "--help")
	if code != 0 {
		t.Fatalf("--help exit %d", code)
	}
	for _, c := range []string{"install", "uninstall", "check", "dev", "identity", "completion"} {
		if !strings.Contains(out, c) {
			t.Errorf("help does not list %q:\n%s", c, out)
		}
	}
	code, out, _ = runWith(t, &recorder{}, "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_tunmeshctl") {
		t.Errorf("completion bash: exit %d, output does not define __start_tunmeshctl", code)
	}
	// Dynamic completion of subcommands and of -o values.
	code, out, _ = runWith(t, &recorder{}, "__complete", "dev", "")
	if code != 0 || !strings.Contains(out, "exec") || !strings.Contains(out, "kube-build") {
		t.Errorf("__complete dev: exit %d:\n%s", code, out)
	}
	code, out, _ = runWith(t, &recorder{}, "__complete", "check", "-o", "")
	if code != 0 || !strings.Contains(out, "json") || !strings.Contains(out, "yaml") {
		t.Errorf("__complete check -o: exit %d:\n%s", code, out)
	}
}

// TestKubeFlags: check takes kubectl's connection flags and -n picks the
// namespace it reads; a kubeconfig that does not exist is an error that
// names it.
func TestKubeFlags(t *testing.T) {
	code, _, stderr := runWith(t, &recorder{}, "check", "--kubeconfig", "/nonexistent/kubeconfig", "--context", "c", "-n", "other")
	if code != 1 || !strings.Contains(stderr, "/nonexistent/kubeconfig") {
		t.Errorf("exit %d, stderr %q; want 1 naming the kubeconfig", code, stderr)
	}
}

// TestInstallCommand: install renders without a cluster when every
// cluster CIDR is given, refuses an external issuer without anchors, and
// uninstall lists what to delete.
func TestInstallCommand(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "none"))
	code, out, stderr := runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.244.0.0/16,10.96.0.0/12", "--tag", "v9", "--registry", "r.example/t")
	if code != 0 {
		t.Fatalf("install: exit %d: %s", code, stderr)
	}
	objs, err := deploy.Decode([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.GetKind()]++
	}
	if kinds["DaemonSet"] != 1 || kinds["Secret"] != 1 || kinds["ConfigMap"] != 2 || !strings.Contains(out, "image: r.example/t/tunmesh-node:v9") {
		t.Errorf("install output kinds %v:\n%s", kinds, out)
	}

	code, out, _ = runWith(t, &recorder{}, "install", "-o", "json", "--set", "clusterCIDRs=10.0.0.0/8")
	if code != 0 || !strings.Contains(out, `"kind": "List"`) {
		t.Errorf("install -o json: exit %d", code)
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "--identity-external-issuer", "--set", "clusterCIDRs=10.0.0.0/8")
	if code != 1 || !strings.Contains(stderr, "--identity-trust-anchors") {
		t.Errorf("external issuer without anchors: exit %d, %q", code, stderr)
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "--set", "clusterCIDR=10.0.0.0/8")
	if code != 2 || !strings.Contains(stderr, `unknown key "clusterCIDR"`) {
		t.Errorf("misspelt setting: exit %d, %q", code, stderr)
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "-n", "elsewhere", "--set", "clusterCIDRs=10.0.0.0/8")
	if code != 2 || !strings.Contains(stderr, `installs into namespace "tunmesh"`) {
		t.Errorf("install -n elsewhere: exit %d, %q", code, stderr)
	}
	code, out, _ = runWith(t, &recorder{}, "uninstall")
	if objs, err := deploy.Decode([]byte(out)); code != 0 || err != nil || len(objs) == 0 || objs[0].GetKind() != "DaemonSet" {
		t.Errorf("uninstall: exit %d, %v:\n%s", code, err, out)
	}
	code, out, _ = runWith(t, &recorder{}, "__complete", "install", "--set", "")
	if code != 0 || !strings.Contains(out, "clusterCIDRs=") {
		t.Errorf("__complete install --set: %s", out)
	}
}
