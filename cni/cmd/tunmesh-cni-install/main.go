// Command tunmesh-cni-install installs the tunmesh-cni chained plugin on a
// node: it runs as a container of the node DaemonSet with the host's CNI bin
// and conf dirs mounted, copies the plugin binary, keeps the primary
// conflist patched, and on SIGTERM removes both again (unless
// -keep-on-exit). See package cni/install.
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

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/install"
	"github.com/tunmesh/tunmesh/cni/plugin"
)

func main() {
	cfg, level, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		os.Exit(2) // the flag package has printed why
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, logger); err != nil {
		logger.Error("tunmesh-cni-install failed", "err", err)
		stop()
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg install.Config, logger *slog.Logger) error {
	cfg.Logger = logger.With("component", "cni-install")
	in, err := install.New(cfg)
	if err != nil {
		return err
	}
	return in.Run(ctx)
}

// parseFlags reads the command line into a Config and a log level.
func parseFlags(args []string, out io.Writer) (install.Config, slog.Level, error) {
	var (
		cfg   install.Config
		level slog.Level
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
	if err := fs.Parse(args); err != nil {
		return install.Config{}, 0, err
	}
	if fs.NArg() > 0 {
		err := fmt.Errorf("unexpected arguments %q", fs.Args())
		fmt.Fprintln(out, err)
		return install.Config{}, 0, err
	}
	return cfg, level, nil
}
