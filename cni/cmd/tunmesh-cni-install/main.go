// Command tunmesh-cni-install installs the tunmesh-cni chained plugin on a
// node: it runs as a container of the node DaemonSet with the host's CNI bin
// and conf dirs mounted, copies the plugin binary, keeps the primary
// conflist patched, and on SIGTERM removes both again (unless
// -keep-on-exit, or, with -uninstall-on-exit=daemonset-deleted, unless its
// DaemonSet still exists: a rollout). See package cni/install.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/install"
	"github.com/tunmesh/tunmesh/cni/install/keep"
	"github.com/tunmesh/tunmesh/cni/plugin"
	"github.com/tunmesh/tunmesh/identity/rbac"
)

// Values of --uninstall-on-exit.
const (
	uninstallAlways           = "always"
	uninstallDaemonSetDeleted = "daemonset-deleted"
)

func main() {
	cfg, level, exit, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		os.Exit(2) // the flag package has printed why
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, exit, logger); err != nil {
		logger.Error("tunmesh-cni-install failed", "err", err)
		stop()
		os.Exit(1)
	}
}

// exitOptions say what to do with the plugin when the installer stops.
type exitOptions struct {
	uninstall             string // uninstallAlways or uninstallDaemonSetDeleted
	podName, podNamespace string // this pod (downward API), for uninstallDaemonSetDeleted
	kubeconfig            string // empty: in-cluster
}

func run(ctx context.Context, cfg install.Config, exit exitOptions, logger *slog.Logger) error {
	cfg.Logger = logger.With("component", "cni-install")
	if exit.uninstall == uninstallDaemonSetDeleted && !cfg.KeepOnExit {
		client, err := kubeClient(exit.kubeconfig)
		if err != nil {
			return err
		}
		// Warn now rather than find out at exit (where anything it cannot
		// tell uninstalls, as without the check).
		if err := rbac.Check(ctx, client, keep.RequiredPermissions(exit.podNamespace)); err != nil {
			cfg.Logger.Warn("cannot tell a rollout from an uninstall on exit: tunmesh-cni will be removed then", "err", err)
		}
		cfg.Keep = keep.WhileDaemonSetExists(client, exit.podNamespace, exit.podName)
	}
	in, err := install.New(cfg)
	if err != nil {
		return err
	}
	return in.Run(ctx)
}

// kubeClient returns a client from kubeconfig, or in-cluster.
func kubeClient(kubeconfig string) (kubernetes.Interface, error) {
	var (
		rc  *rest.Config
		err error
	)
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config (needed by --uninstall-on-exit=%s): %w", uninstallDaemonSetDeleted, err)
	}
	rc.UserAgent = "tunmesh-cni-install"
	return kubernetes.NewForConfig(rc)
}

// parseFlags reads the command line into a Config, a log level and what
// to do on exit.
func parseFlags(args []string, out io.Writer) (install.Config, slog.Level, exitOptions, error) {
	var (
		cfg   install.Config
		level slog.Level
		exit  exitOptions
	)
	fs := flag.NewFlagSet("tunmesh-cni-install", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.BinSource, "bin-source", "/opt/tunmesh/bin/tunmesh-cni", "the tunmesh-cni binary to install")
	fs.StringVar(&cfg.BinDir, "bin-dir", "/host/opt/cni/bin", "the host's CNI bin dir, as mounted")
	fs.StringVar(&cfg.ConfDir, "conf-dir", "/host/etc/cni/net.d", "the host's CNI conf dir, as mounted")
	fs.StringVar(&cfg.PluginConfig.Socket, "socket", cniapi.DefaultSocket, "the agent's CNI socket, as the plugin sees it on the host")
	fs.StringVar(&cfg.PluginConfig.Timeout, "timeout", plugin.DefaultTimeout, "the plugin's per-request timeout")
	fs.BoolVar(&cfg.PluginConfig.FailOpen, "fail-open", false, "let pods start unmeshed while the agent is down")
	fs.StringVar(&cfg.PluginConfig.LogFile, "log-file", "", "the plugin's log file on the host (default: stderr)")
	fs.BoolVar(&cfg.KeepOnExit, "keep-on-exit", false, "leave the plugin installed on exit (upgrades)")
	fs.DurationVar(&cfg.ResyncInterval, "resync-interval", 0, "re-check the conf dir this often without events (default 1m)")
	fs.TextVar(&level, "log-level", slog.LevelInfo, "log level: DEBUG, INFO, WARN or ERROR")
	fs.StringVar(&exit.uninstall, "uninstall-on-exit", uninstallAlways,
		"when to remove the plugin on exit: always, or daemonset-deleted (only when this pod's DaemonSet is deleted or being deleted: kept through rollouts; needs API access)")
	fs.StringVar(&exit.podName, "pod-name", os.Getenv("POD_NAME"), "this pod's name (env POD_NAME), for --uninstall-on-exit=daemonset-deleted")
	fs.StringVar(&exit.podNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "this pod's namespace (env POD_NAMESPACE)")
	fs.StringVar(&exit.kubeconfig, "kubeconfig", "", "kubeconfig for --uninstall-on-exit=daemonset-deleted (empty: in-cluster)")
	fail := func(err error) (install.Config, slog.Level, exitOptions, error) {
		fmt.Fprintln(out, err)
		return install.Config{}, 0, exitOptions{}, err
	}
	if err := fs.Parse(args); err != nil {
		return install.Config{}, 0, exitOptions{}, err
	}
	if fs.NArg() > 0 {
		return fail(fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	switch exit.uninstall {
	case uninstallAlways:
	case uninstallDaemonSetDeleted:
		if exit.podName == "" || exit.podNamespace == "" {
			return fail(fmt.Errorf("--uninstall-on-exit=%s needs --pod-name and --pod-namespace (or POD_NAME, POD_NAMESPACE)", uninstallDaemonSetDeleted))
		}
	default:
		return fail(fmt.Errorf("--uninstall-on-exit %q: want %s or %s", exit.uninstall, uninstallAlways, uninstallDaemonSetDeleted))
	}
	return cfg, level, exit, nil
}
