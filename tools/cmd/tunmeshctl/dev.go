package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"text/tabwriter"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/kubebuild"
)

// devFlags are the flags every dev subcommand shares.
type devFlags struct {
	cfg      devcluster.Config
	cacheDir string
}

func newDevFlags(name string, stderr io.Writer) (*flag.FlagSet, *devFlags) {
	fs := flag.NewFlagSet("tunmeshctl dev "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := &devFlags{}
	fs.StringVar(&d.cfg.Name, "name", envOr("TUNMESH_DEV_NAME", devcluster.DefaultName), "cluster name (prefix of everything it creates)")
	fs.StringVar(&d.cfg.Root, "root", envOr("TUNMESH_DEV_ROOT", devcluster.DefaultRoot), "state root directory")
	fs.StringVar(&d.cacheDir, "cache-dir", kubebuild.DefaultCacheDir(), "cache for built Kubernetes binaries")
	fs.StringVar(&d.cfg.KubeBinDir, "kube-bin-dir", "", "directory with kube-apiserver, kube-controller-manager, kubectl (default: build into the cache)")
	fs.StringVar(&d.cfg.BinDir, "bin-dir", "", "directory with tunmesh binaries (default: next to tunmeshctl)")
	fs.StringVar(&d.cfg.CNIBinDir, "cni-bin-dir", devcluster.DefaultCNIBinDir, "reference CNI plugins")
	fs.StringVar(&d.cfg.Etcd, "etcd", devcluster.DefaultEtcd, "etcd binary")
	return fs, d
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	sub, rest := args[0], args[1:]
	fs, d := newDevFlags(sub, stderr)
	var (
		nodes    int
		podNS    string
		execNode string
	)
	switch sub {
	case "up", "supervise":
		fs.IntVar(&nodes, "nodes", 2, "number of nodes")
		fs.BoolVar(&d.cfg.Mesh, "mesh", true, "run tunmesh on the cluster (identity, an agent per node, tunmesh-cni)")
		fs.BoolFunc("no-mesh", "a bare cluster: no tunmesh (same as --mesh=false)", func(string) error { d.cfg.Mesh = false; return nil })
	case "exec":
		fs.StringVar(&podNS, "n", "default", "pod namespace")
		fs.StringVar(&podNS, "namespace", "default", "pod namespace")
		fs.StringVar(&execNode, "node", "", "run in this node's namespace instead of a pod's")
	case "down", "status", "kubeconfig", "kube-build":
	default:
		fmt.Fprintf(stderr, "tunmeshctl dev: unknown command %q\n\n%s", sub, usage)
		return 2
	}
	// Everything after the first "--" is the command (dev exec); flags may
	// come before or after the positional arguments.
	var cmdArgs []string
	for i, a := range rest {
		if a == "--" {
			rest, cmdArgs = rest[:i], rest[i+1:]
			break
		}
	}
	var pos []string
	for {
		if err := fs.Parse(rest); err != nil {
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	rest = cmdArgs
	d.cfg.Nodes = nodes
	if sub != "exec" && (len(pos) > 0 || len(rest) > 0) {
		fmt.Fprintf(stderr, "tunmeshctl dev %s: unexpected arguments %q\n", sub, append(pos, rest...))
		return 2
	}

	var err error
	switch sub {
	case "up":
		err = devUp(ctx, d, stdout)
	case "supervise":
		err = devcluster.Supervise(ctx, d.cfg, log)
	case "down":
		err = devcluster.Down(d.cfg, stdout)
	case "status":
		err = devStatus(ctx, d.cfg, stdout)
	case "kubeconfig":
		var st *devcluster.State
		if st, err = readState(d.cfg); err == nil {
			fmt.Fprintln(stdout, st.Kubeconfig)
		}
	case "kube-build":
		var bin string
		if bin, err = kubebuild.Ensure(ctx, d.cacheDir, stderr); err == nil {
			fmt.Fprintln(stdout, bin)
		}
	case "exec":
		return devExec(ctx, d.cfg, pos, podNS, execNode, rest, stdout, stderr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tunmeshctl dev %s: %v\n", sub, err)
		return 1
	}
	return 0
}

func readState(cfg devcluster.Config) (*devcluster.State, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return nil, err
	}
	return devcluster.ReadState(cfg)
}

func devUp(ctx context.Context, d *devFlags, stdout io.Writer) error {
	if d.cfg.KubeBinDir == "" {
		bin, err := kubebuild.Ensure(ctx, d.cacheDir, stdout)
		if err != nil {
			return err
		}
		d.cfg.KubeBinDir = bin
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	if err := devcluster.Up(ctx, d.cfg, self, stdout); err != nil {
		return err
	}
	st, err := readState(d.cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\ncluster %q is up. Use it with:\n  export KUBECONFIG=%s\n  %s get nodes\n", st.Name, st.Kubeconfig, filepathJoin(d.cfg.KubeBinDir, "kubectl"))
	return nil
}

func filepathJoin(dir, name string) string { return strings.TrimSuffix(dir, "/") + "/" + name }

func devStatus(ctx context.Context, cfg devcluster.Config, stdout io.Writer) error {
	st, err := readState(cfg)
	if err != nil {
		return err
	}
	nodes, err := devcluster.NodeStatus(ctx, st)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "cluster %q running (supervisor pid %d, ready after %s)\n", st.Name, st.SupervisorPID, st.ReadyAfter)
	fmt.Fprintf(stdout, "api server: https://%s (host), %s (cluster network)\n", st.APIServer, st.APIServerNode)
	fmt.Fprintf(stdout, "kubeconfig: %s\n\n", st.Kubeconfig)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSTATUS\tIP\tPOD CIDR\tPODS\tNETNS")
	for _, n := range nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", n.Name, n.Status, n.IP, n.PodCIDR, n.Pods, n.Netns)
	}
	return tw.Flush()
}

func devExec(ctx context.Context, cfg devcluster.Config, pos []string, podNS, node string, argv []string, stdout, stderr io.Writer) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "tunmeshctl dev exec: %v\n", err)
		return 1
	}
	if len(argv) == 0 {
		return fail(errors.New("no command given (use: dev exec POD -- CMD...)"))
	}
	st, err := readState(cfg)
	if err != nil {
		return fail(err)
	}
	var netns string
	switch {
	case node != "" && len(pos) == 0:
		netns, err = devcluster.NodeNetns(st, node)
	case node == "" && len(pos) == 1:
		netns, err = devcluster.PodNetns(ctx, cfg, st, podNS, pos[0])
	default:
		err = errors.New("give exactly one of POD or --node NODE")
	}
	if err != nil {
		return fail(err)
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + netns, "--"}, argv...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, stdout, stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		return fail(err)
	}
	return 0
}
