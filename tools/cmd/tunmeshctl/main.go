// Command tunmeshctl is tunmesh's command-line tool: install and uninstall
// (`tunmeshctl install | kubectl apply -f -`), `check`, identity bootstrap
// and inspect, and the local development cluster (`tunmeshctl dev ...`).
// It follows kubectl's conventions: cobra subcommands with help and shell
// completion, and k8s.io/cli-runtime's ConfigFlags for the commands that
// talk to a cluster, so --kubeconfig, --context and -n mean what they mean
// in kubectl.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr})
	stop()
	os.Exit(code)
}

// usageError marks a command line that could not be parsed: exit code 2,
// as before the move to cobra (scripts and the e2e harness rely on it).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// exitError carries a command's own exit code (dev exec passes the child's
// through) without printing anything more.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// run executes a command line and returns the exit code: 0 success, 1 a
// failed command, 2 a usage error, or the exit code of a `dev exec` child.
func run(ctx context.Context, args []string, streams genericiooptions.IOStreams) int {
	root := newRootCmd(streams, defaultOps())
	root.SetArgs(args)
	return exitCode(root.ExecuteContext(ctx), streams, root, args)
}

// exitCode maps a command's error to the exit code, printing it.
func exitCode(err error, streams genericiooptions.IOStreams, root *cobra.Command, args []string) int {
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(streams.ErrOut, "Error: %v\nRun '%s --help' for usage.\n", err, commandPath(root, args))
		return 2
	}
	fmt.Fprintf(streams.ErrOut, "Error: %v\n", err)
	return 1
}

// commandPath names the (sub)command a command line selects, for the hint
// after a usage error.
func commandPath(root *cobra.Command, args []string) string {
	if c, _, err := root.Find(args); err == nil && c != nil {
		return c.CommandPath()
	}
	return root.CommandPath()
}

func newRootCmd(streams genericiooptions.IOStreams, ops ops) *cobra.Command {
	root := &cobra.Command{
		Use:   "tunmeshctl",
		Short: "tunmeshctl: install, check and develop tunmesh, the sidecar-free service mesh",
		Long: `tunmeshctl installs tunmesh on a cluster and checks it, manages the identity
trust anchors, and runs the local development cluster.

  tunmeshctl install | kubectl apply -f -     install tunmesh on the current cluster
  tunmeshctl check                            check the control and data plane
  tunmeshctl dev up                           start the local cluster`,
		SilenceUsage:  true,
		SilenceErrors: true,
		// A bare `tunmeshctl` prints help and fails, as before.
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SetOut(streams.ErrOut)
			_ = cmd.Help()
			return usageError{errors.New("no command given")}
		},
	}
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.ErrOut)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	log := slog.New(slog.NewTextHandler(streams.ErrOut, &slog.HandlerOptions{Level: slog.LevelInfo}))
	root.AddCommand(
		newInstallCmd(streams),
		newUninstallCmd(streams),
		newCheckCmd(streams),
		newIdentityCmd(streams),
		newDevCmd(streams, ops, log),
		newAuthzCmd(streams),
		newCaptureCmd(streams),
		newEdgesCmd(streams),
		newTapCmd(streams),
	)
	// Unknown subcommands and wrong arguments are usage errors too.
	wrapArgs(root)
	return root
}

// wrapArgs turns argument-validation failures into usage errors (exit 2)
// for a command and its children.
func wrapArgs(c *cobra.Command) {
	if c.Args != nil {
		orig := c.Args
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := orig(cmd, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	if c.HasSubCommands() && c.RunE == nil && c.Run == nil {
		// A group (dev, identity) called bare or with an unknown verb.
		c.Args = func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())}
			}
			return nil
		}
		c.RunE = func(cmd *cobra.Command, args []string) error {
			cmd.SetOut(cmd.ErrOrStderr())
			_ = cmd.Help()
			return usageError{fmt.Errorf("%s: no command given", cmd.CommandPath())}
		}
	}
	for _, sub := range c.Commands() {
		wrapArgs(sub)
	}
}

// writers returns a command's output streams (tests set them on the root).
func writers(cmd *cobra.Command) (stdout, stderr io.Writer) {
	return cmd.OutOrStdout(), cmd.ErrOrStderr()
}
