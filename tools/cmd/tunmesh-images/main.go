// Command tunmesh-images builds tunmesh's container images as OCI archives
// (bin/images/<name>.tar) without a container engine: static binaries
// compiled here, one layer each, reproducible digests. Import them with
// `ctr -n k8s.io images import bin/images/tunmesh-node.tar`, or push them
// with any OCI tool (`crane push`, `skopeo copy oci-archive:...`).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"text/tabwriter"

	"github.com/tunmesh/tunmesh/tools/internal/images"
)

type config struct {
	out, registry, tag, arch, moduleDir string
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "tunmesh-images:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string, out io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("tunmesh-images", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&c.out, "o", "bin/images", "directory for the OCI archives")
	fs.StringVar(&c.registry, "registry", images.DefaultRegistry, "registry (and path) of the image references")
	fs.StringVar(&c.tag, "tag", images.DefaultTag, "tag of the image references")
	fs.StringVar(&c.arch, "arch", runtime.GOARCH, "target architecture (GOARCH)")
	fs.StringVar(&c.moduleDir, "module-dir", ".", "root of the tunmesh module")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		err := fmt.Errorf("unexpected arguments %q", fs.Args())
		fmt.Fprintln(out, err)
		return c, err
	}
	return c, nil
}

func run(ctx context.Context, c config, out io.Writer) error {
	binDir := filepath.Join(c.out, ".bin", c.arch)
	fmt.Fprintf(out, "building static binaries (linux/%s) into %s\n", c.arch, binDir)
	if err := images.BuildBinaries(ctx, c.moduleDir, binDir, c.arch, os.Stderr); err != nil {
		return err
	}
	res, err := images.WriteAll(images.Specs(binDir), c.arch, c.registry, c.tag, c.out)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tDIGEST\tLAYER (gzip)\tARCHIVE")
	for _, r := range res {
		fmt.Fprintf(tw, "%s\t%s\t%.1f MiB\t%s\n", r.Ref, r.Digest.String()[:19], float64(r.LayerSize)/(1<<20), r.Archive)
	}
	return tw.Flush()
}
