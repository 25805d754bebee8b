// Command tunmeshctl is tunmesh's command-line tool: the local development
// cluster (`tunmeshctl dev ...`), identity bootstrap/inspect and `check`.
// Install, edges, tap and capture join it as they land.
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
  tunmeshctl dev up [--nodes N] [--no-mesh]     start the local cluster (with the mesh unless --no-mesh)
  tunmeshctl dev down                           remove the local cluster, also after a crash
  tunmeshctl dev status                         show the local cluster
  tunmeshctl dev kubeconfig                     print the admin kubeconfig path
  tunmeshctl dev exec POD [-n NS] -- CMD...     run CMD in the pod's network namespace
  tunmeshctl dev exec --node NODE -- CMD...     run CMD in the node's network namespace
  tunmeshctl dev kube-build                     build the Kubernetes binaries into the cache

  tunmeshctl identity bootstrap [--dir D]       create a dev trust anchor + issuer (files and Secret manifest)
  tunmeshctl identity inspect FILE.pem          show a certificate chain
  tunmeshctl check [--kubeconfig K]             check trust anchors, issuer and agents' workload certificates

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
	case "identity":
		return runIdentity(args[1:], stdout, stderr)
	case "check":
		return runCheck(ctx, args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "tunmeshctl: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
