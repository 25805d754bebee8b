package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/tools/internal/devcluster"
	"github.com/tunmesh/tunmesh/tools/internal/kubebuild"
)

// ops are the operations the dev commands run: the real ones in main,
// recorders in the command-line tests (which check parsing, not clusters).
type ops struct {
	devUp        func(ctx context.Context, d *devFlags, stdout io.Writer) error
	devSupervise func(ctx context.Context, cfg devcluster.Config, log *slog.Logger) error
	devDown      func(cfg devcluster.Config, stdout io.Writer) error
	devStatus    func(ctx context.Context, cfg devcluster.Config, stdout io.Writer) error
	devKubecfg   func(cfg devcluster.Config, stdout io.Writer) error
	kubeBuild    func(ctx context.Context, cacheDir string, stdout, stderr io.Writer) error
	devExec      func(ctx context.Context, cfg devcluster.Config, e devExecArgs, streams genericiooptions.IOStreams) error
}

func defaultOps() ops {
	return ops{
		devUp:        devUp,
		devSupervise: devcluster.Supervise,
		devDown:      devcluster.Down,
		devStatus:    devStatus,
		devKubecfg: func(cfg devcluster.Config, stdout io.Writer) error {
			st, err := readState(cfg)
			if err == nil {
				fmt.Fprintln(stdout, st.Kubeconfig)
			}
			return err
		},
		kubeBuild: func(ctx context.Context, cacheDir string, stdout, stderr io.Writer) error {
			bin, err := kubebuild.Ensure(ctx, cacheDir, stderr)
			if err == nil {
				fmt.Fprintln(stdout, bin)
			}
			return err
		},
		devExec: devExec,
	}
}

// devFlags are the flags every dev subcommand shares.
type devFlags struct {
	cfg      devcluster.Config
	cacheDir string
}

// addDevFlags registers the flags every dev subcommand takes.
func addDevFlags(fs *pflag.FlagSet, d *devFlags) {
	fs.StringVar(&d.cfg.Name, "name", envOr("TUNMESH_DEV_NAME", devcluster.DefaultName), "cluster name (prefix of everything it creates; env TUNMESH_DEV_NAME)")
	fs.StringVar(&d.cfg.Root, "root", envOr("TUNMESH_DEV_ROOT", devcluster.DefaultRoot), "state root directory (env TUNMESH_DEV_ROOT)")
	fs.StringVar(&d.cacheDir, "cache-dir", kubebuild.DefaultCacheDir(), "cache for built Kubernetes binaries")
	fs.StringVar(&d.cfg.KubeBinDir, "kube-bin-dir", "", "directory with kube-apiserver, kube-controller-manager, kubectl (default: build into the cache)")
	fs.StringVar(&d.cfg.BinDir, "bin-dir", "", "directory with tunmesh binaries (default: next to tunmeshctl)")
	fs.StringVar(&d.cfg.CNIBinDir, "cni-bin-dir", devcluster.DefaultCNIBinDir, "reference CNI plugins")
	fs.StringVar(&d.cfg.Etcd, "etcd", devcluster.DefaultEtcd, "etcd binary")
}

// addClusterShapeFlags registers the flags of the commands that create a
// cluster (up, and the supervisor that up starts with the same values).
func addClusterShapeFlags(cmd *cobra.Command, d *devFlags) {
	fs := cmd.Flags()
	fs.IntVar(&d.cfg.Nodes, "nodes", 2, "number of nodes")
	fs.BoolVar(&d.cfg.Mesh, "mesh", true, "run tunmesh on the cluster (identity, an agent per node, tunmesh-cni)")
	noMesh := fs.Bool("no-mesh", false, "a bare cluster: no tunmesh (same as --mesh=false)")
	fs.BoolVar(&d.cfg.RealNodes, "real-nodes", false, "nodes run a real kubelet + containerd and the real kube-scheduler; no mesh (install it with tunmeshctl install)")
	fs.StringVar(&d.cfg.ImageDir, "image-dir", "", "OCI image archives imported into real nodes (default: <bin-dir>/images, from make images)")
	fs.StringVar(&d.cfg.Transport, "transport", "tcp", "agents' transport between nodes: tcp or wireguard (userspace WireGuard overlay; docs/wireguard.md)")
	fs.IntVar(&d.cfg.WireGuardMTU, "wireguard-mtu", 0, "with --transport wireguard: the agents' overlay MTU for the mesh tunnels (0: the agent's default, 1420)")
	fs.BoolVar(&d.cfg.EncryptAll, "encrypt-all", false, "with --transport wireguard: all cross-node pod traffic (UDP, ICMP, non-meshed pods, skipped ports) rides WireGuard")
	fs.BoolVar(&d.cfg.WireGuardRequired, "wireguard-required", false, "with --transport wireguard: the agents' strict mode (--wireguard-required: nodes without a key refused, never reached on the underlay)")
	prev := cmd.PreRunE
	cmd.PreRunE = func(c *cobra.Command, args []string) error {
		if *noMesh {
			d.cfg.Mesh = false
		}
		if prev != nil {
			return prev(c, args)
		}
		return nil
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func newDevCmd(streams genericiooptions.IOStreams, o ops, log *slog.Logger) *cobra.Command {
	dev := &cobra.Command{
		Use:   "dev",
		Short: "Run the local development cluster",
		Long: `The local development cluster: an API server, controllers and nodes in
network namespaces on this machine, with tunmesh on it unless --no-mesh.

Every dev command accepts --name (default ` + devcluster.DefaultName + `, env TUNMESH_DEV_NAME) and
--root (default ` + devcluster.DefaultRoot + `, env TUNMESH_DEV_ROOT).`,
	}
	// sub builds one dev subcommand with its own devFlags; extra registers
	// the flags only that subcommand takes (on the same devFlags).
	sub := func(use, short string, args cobra.PositionalArgs, run func(cmd *cobra.Command, d *devFlags, args []string) error, extra ...func(*cobra.Command, *devFlags)) *cobra.Command {
		d := &devFlags{}
		c := &cobra.Command{
			Use:   use,
			Short: short,
			Args:  args,
			RunE: func(cmd *cobra.Command, args []string) error {
				if err := run(cmd, d, args); err != nil {
					var ee exitError
					if errors.As(err, &ee) {
						return err
					}
					return fmt.Errorf("%s: %w", cmd.CommandPath(), err)
				}
				return nil
			},
		}
		addDevFlags(c.Flags(), d)
		for _, f := range extra {
			f(c, d)
		}
		return c
	}
	up := sub("up", "Start the local cluster (with the mesh unless --no-mesh)", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error {
			return o.devUp(cmd.Context(), d, cmd.OutOrStdout())
		}, addClusterShapeFlags)
	supervise := sub("supervise", "Run the cluster in the foreground (dev up starts this detached)", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error {
			return o.devSupervise(cmd.Context(), d.cfg, log)
		}, addClusterShapeFlags)
	supervise.Hidden = true
	down := sub("down", "Remove the local cluster, also after a crash", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error { return o.devDown(d.cfg, cmd.OutOrStdout()) })
	status := sub("status", "Show the local cluster", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error {
			return o.devStatus(cmd.Context(), d.cfg, cmd.OutOrStdout())
		})
	kubecfg := sub("kubeconfig", "Print the admin kubeconfig path", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error { return o.devKubecfg(d.cfg, cmd.OutOrStdout()) })
	kb := sub("kube-build", "Build the Kubernetes binaries into the cache and print their directory", cobra.NoArgs,
		func(cmd *cobra.Command, d *devFlags, _ []string) error {
			return o.kubeBuild(cmd.Context(), d.cacheDir, cmd.OutOrStdout(), cmd.ErrOrStderr())
		})

	var e devExecArgs
	ex := sub("exec (POD [-n NS] | --node NODE) -- CMD...", "Run CMD in a pod's or a node's network namespace",
		func(cmd *cobra.Command, args []string) error {
			dash := cmd.ArgsLenAtDash()
			if dash < 0 || dash == len(args) {
				return errors.New("no command given (use: dev exec POD -- CMD...)")
			}
			if dash > 1 {
				return fmt.Errorf("unexpected arguments %q before --", args[1:dash])
			}
			return nil
		},
		func(cmd *cobra.Command, d *devFlags, args []string) error {
			dash := cmd.ArgsLenAtDash()
			e.pods, e.argv = args[:dash], args[dash:]
			return o.devExec(cmd.Context(), d.cfg, e, genericiooptions.IOStreams{In: streams.In, Out: cmd.OutOrStdout(), ErrOut: cmd.ErrOrStderr()})
		})
	ex.Flags().StringVarP(&e.namespace, "namespace", "n", "default", "pod namespace")
	ex.Flags().StringVar(&e.node, "node", "", "run in this node's namespace instead of a pod's")
	ex.Example = `  tunmeshctl dev exec client-7d9 -n demo -- curl -s world.demo
  tunmeshctl dev exec --node node-1 -- ip route`
	dev.AddCommand(up, supervise, down, status, kubecfg, ex, kb)
	return dev
}

// devExecArgs is what `dev exec` was asked to run.
type devExecArgs struct {
	pods      []string // zero or one pod name
	namespace string
	node      string
	argv      []string
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
	fmt.Fprintf(stdout, "\ncluster %q is up. Use it with:\n  export KUBECONFIG=%s\n  %s get nodes\n", st.Name, st.Kubeconfig, filepath.Join(d.cfg.KubeBinDir, "kubectl"))
	return nil
}

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

// devExec runs argv in a pod's or a node's network namespace; the child's
// exit code becomes tunmeshctl's.
func devExec(ctx context.Context, cfg devcluster.Config, e devExecArgs, streams genericiooptions.IOStreams) error {
	st, err := readState(cfg)
	if err != nil {
		return err
	}
	var netns string
	switch {
	case e.node != "" && len(e.pods) == 0:
		netns, err = devcluster.NodeNetns(st, e.node)
	case e.node == "" && len(e.pods) == 1:
		netns, err = devcluster.PodNetns(ctx, cfg, st, e.namespace, e.pods[0])
	default:
		err = usageError{errors.New("give exactly one of POD or --node NODE")}
	}
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + netns, "--"}, e.argv...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = streams.In, streams.Out, streams.ErrOut
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return exitError{ee.ExitCode()}
		}
		return err
	}
	return nil
}
