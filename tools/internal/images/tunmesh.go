package images

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Defaults for image references: ghcr.io/tunmesh/<name>:dev.
const (
	DefaultRegistry = "ghcr.io/tunmesh"
	DefaultTag      = "dev"
)

// Image names.
const (
	Node     = "tunmesh-node"
	CNI      = "tunmesh-cni"
	Identity = "tunmesh-identity"
	Workload = "tunmesh-workload"
	Pause    = "tunmesh-pause"
)

// Binary is a Go command the images carry.
type Binary struct {
	Name    string // output file name
	Package string // import path relative to the module root
}

// Binaries are the commands BuildBinaries compiles.
var Binaries = []Binary{
	{"tunmesh-node", "./node/cmd/tunmesh-node"},
	{"tunmesh-cni", "./cni/cmd/tunmesh-cni"},
	{"tunmesh-cni-install", "./cni/cmd/tunmesh-cni-install"},
	{"tunmesh-identity", "./identity/cmd/tunmesh-identity"},
	{"tunmesh-workload", "./tools/cmd/tunmesh-workload"},
	{"tunmesh-pause", "./tools/cmd/tunmesh-pause"},
}

// BuildBinaries compiles Binaries from the module at moduleDir into outDir
// as static linux executables: CGO_ENABLED=0 (no libc needed in the
// image), -trimpath and no VCS stamp (the same sources give the same bytes
// whatever the checkout path or working-tree state), -s -w (no symbol
// tables; panics still print file:line).
func BuildBinaries(ctx context.Context, moduleDir, outDir, arch string, out io.Writer) error {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return fmt.Errorf("create binary dir: %w", err)
	}
	abs, err := filepath.Abs(outDir)
	if err != nil {
		return err
	}
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", abs + "/"}
	for _, b := range Binaries {
		args = append(args, b.Package)
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s: %w", strings.Join(args[6:], " "), err)
	}
	return nil
}

// Specs are tunmesh's images, made from binaries in binDir.
//
// The agent and the CNI installer run as root: the agent enters pod
// network namespaces, creates TUN devices and routes (the DaemonSet grants
// it capabilities, not privileged), and the installer writes the host's CNI
// directories. The identity service, the test workload and pause need no
// privilege and run as 65532.
func Specs(binDir string) []Spec {
	bin := func(name string) string { return filepath.Join(binDir, name) }
	labels := func(title, desc string) map[string]string {
		return map[string]string{
			"org.opencontainers.image.title":       title,
			"org.opencontainers.image.description": desc,
			"org.opencontainers.image.source":      "https://github.com/tunmesh/tunmesh",
			"org.opencontainers.image.licenses":    "Apache-2.0",
		}
	}
	return []Spec{
		{
			Name:       Node,
			Files:      []File{{Path: "/usr/local/bin/tunmesh-node", Source: bin("tunmesh-node")}},
			Dirs:       []string{"/var/lib/tunmesh", "/var/run/tunmesh"},
			TmpDirs:    []string{"/tmp"},
			Entrypoint: []string{"/usr/local/bin/tunmesh-node"},
			Labels:     labels("tunmesh-node", "tunmesh per-node agent"),
		},
		{
			Name: CNI,
			Files: []File{
				{Path: "/usr/local/bin/tunmesh-cni-install", Source: bin("tunmesh-cni-install")},
				// The installer copies this binary into the host's CNI bin dir
				// (its --bin-source default).
				{Path: "/opt/tunmesh/bin/tunmesh-cni", Source: bin("tunmesh-cni")},
			},
			TmpDirs:    []string{"/tmp"},
			Entrypoint: []string{"/usr/local/bin/tunmesh-cni-install"},
			Labels:     labels("tunmesh-cni", "tunmesh CNI plugin and its installer"),
		},
		{
			Name:       Identity,
			Files:      []File{{Path: "/usr/local/bin/tunmesh-identity", Source: bin("tunmesh-identity")}},
			TmpDirs:    []string{"/tmp"},
			Entrypoint: []string{"/usr/local/bin/tunmesh-identity"},
			User:       NonRoot,
			Labels:     labels("tunmesh-identity", "tunmesh certificate authority"),
		},
		{
			Name:       Workload,
			Files:      []File{{Path: "/usr/local/bin/tunmesh-workload", Source: bin("tunmesh-workload")}},
			TmpDirs:    []string{"/tmp"},
			Entrypoint: []string{"/usr/local/bin/tunmesh-workload"},
			User:       NonRoot,
			WorkingDir: "/tmp",
			Labels:     labels("tunmesh-workload", "test and demo workload (echo, http, sink, source)"),
		},
		{
			Name:       Pause,
			Files:      []File{{Path: "/pause", Source: bin("tunmesh-pause")}},
			Entrypoint: []string{"/pause"},
			User:       NonRoot,
			Labels:     labels("tunmesh-pause", "pod sandbox holder"),
		},
	}
}

// Ref is the image reference registry/name:tag.
func Ref(registry, name, tag string) string {
	return strings.TrimSuffix(registry, "/") + "/" + name + ":" + tag
}

// Result describes one written archive.
type Result struct {
	Name        string
	Ref         string
	Digest      v1.Hash // manifest digest
	Archive     string  // path of the .tar
	ArchiveSize int64   // bytes of the .tar
	LayerSize   int64   // compressed bytes of the image's layer(s)
}

// WriteAll builds every spec and writes outDir/<name>.tar named
// registry/name:tag.
func WriteAll(specs []Spec, arch, registry, tag, outDir string) ([]Result, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fmt.Errorf("create image dir: %w", err)
	}
	var res []Result
	for _, s := range specs {
		img, err := BuildFor(s, arch)
		if err != nil {
			return nil, err
		}
		ref := Ref(registry, s.Name, tag)
		r, err := writeOne(img, ref, filepath.Join(outDir, s.Name+".tar"))
		if err != nil {
			return nil, err
		}
		r.Name = s.Name
		res = append(res, r)
	}
	return res, nil
}

func writeOne(img v1.Image, ref, dst string) (Result, error) {
	r := Result{Ref: ref, Archive: dst}
	d, err := img.Digest()
	if err != nil {
		return r, fmt.Errorf("digest %s: %w", ref, err)
	}
	r.Digest = d
	layers, err := img.Layers()
	if err != nil {
		return r, fmt.Errorf("layers of %s: %w", ref, err)
	}
	for _, l := range layers {
		n, err := l.Size()
		if err != nil {
			return r, fmt.Errorf("layer size of %s: %w", ref, err)
		}
		r.LayerSize += n
	}
	tmp := dst + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return r, fmt.Errorf("create %s: %w", tmp, err)
	}
	if err := WriteArchive(f, img, ref); err != nil {
		f.Close()
		os.Remove(tmp)
		return r, err
	}
	st, err := f.Stat()
	if err == nil {
		r.ArchiveSize = st.Size()
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return r, fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return r, fmt.Errorf("rename %s: %w", dst, err)
	}
	return r, nil
}
