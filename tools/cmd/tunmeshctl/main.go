// Command tunmeshctl is tunmesh's command-line tool. Today it runs the local
// development cluster (`tunmeshctl dev ...`); install, check, edges, tap,
// capture and identity commands join it as they land.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

const usage = `tunmeshctl: the tunmesh command-line tool

Usage:
  tunmeshctl dev up [--nodes N]                 start the local cluster
  tunmeshctl dev down                           remove the local cluster, also after a crash
  tunmeshctl dev status                         show the local cluster
  tunmeshctl dev kubeconfig                     print the admin kubeconfig path
  tunmeshctl dev exec POD [-n NS] -- CMD...     run CMD in the pod's network namespace
  tunmeshctl dev exec --node NODE -- CMD...     run CMD in the node's network namespace
  tunmeshctl dev kube-build                     build the Kubernetes binaries into the cache

Every dev command accepts --name (default tmdev, env TUNMESH_DEV_NAME) and
--root (default /var/lib/tunmesh-dev, env TUNMESH_DEV_ROOT).
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches a command line and returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	switch args[0] {
	case "dev":
		return runDev(ctx, args[1:], stdout, stderr, log)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "tunmeshctl: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
