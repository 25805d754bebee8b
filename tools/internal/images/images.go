// Package images builds tunmesh's container images without a container
// engine: each image is one layer holding static binaries (no base image),
// assembled with go-containerregistry and written as an OCI image-layout
// archive that `ctr images import` (and any OCI tool: skopeo, crane, podman)
// reads. Builds are reproducible: the same binaries give the same digest,
// because every timestamp is the epoch, entries are sorted, ownership is
// numeric and the config's Created is 1970-01-01.
package images

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations containerd's importer reads from the archive's index.json:
// the full image name, and the OCI ref name (the tag).
const (
	AnnotationContainerdName = "io.containerd.image.name"
	AnnotationRefName        = "org.opencontainers.image.ref.name"
)

// NonRoot is the user of images whose binary needs no privilege (the
// distroless "nonroot" uid/gid).
const NonRoot = "65532:65532"

// epoch is every timestamp in an image: reproducible builds.
var epoch = time.Unix(0, 0).UTC()

// Spec describes one image.
type Spec struct {
	// Name is the repository name without registry, e.g. "tunmesh-node".
	Name string
	// Files are the image's content; parent directories are added.
	Files []File
	// Dirs are extra empty directories (mode 0755, or 1777 for tmp dirs
	// named in TmpDirs).
	Dirs []string
	// TmpDirs are world-writable sticky directories (e.g. /tmp).
	TmpDirs    []string
	Entrypoint []string
	Cmd        []string
	Env        []string
	// User is "uid:gid"; empty means root.
	User       string
	WorkingDir string
	Labels     map[string]string
}

// File is one regular file of an image.
type File struct {
	Path   string      // absolute path inside the image
	Source string      // file on the build machine
	Mode   fs.FileMode // permission bits; zero means 0755
}

// ErrInvalidSpec reports a spec that cannot become an image.
var ErrInvalidSpec = errors.New("invalid image spec")

func (s Spec) validate() error {
	if s.Name == "" {
		return fmt.Errorf("%w: empty name", ErrInvalidSpec)
	}
	if len(s.Entrypoint) == 0 {
		return fmt.Errorf("%w: image %q has no entrypoint", ErrInvalidSpec, s.Name)
	}
	for _, f := range s.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" {
			return fmt.Errorf("%w: image %q: file path %q must be absolute and clean", ErrInvalidSpec, s.Name, f.Path)
		}
	}
	return nil
}

// Build assembles the image for the running platform's architecture
// (linux/GOARCH).
func Build(s Spec) (v1.Image, error) {
	return BuildFor(s, runtime.GOARCH)
}

// BuildFor assembles the image for linux/arch.
func BuildFor(s Spec, arch string) (v1.Image, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	layerTar, err := layerBytes(s)
	if err != nil {
		return nil, fmt.Errorf("image %q: %w", s.Name, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("image %q: layer: %w", s.Name, err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "tunmesh images: " + s.Name,
			Comment:   "static binaries, no base image",
		},
	})
	if err != nil {
		return nil, fmt.Errorf("image %q: append layer: %w", s.Name, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image %q: config: %w", s.Name, err)
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config = v1.Config{
		Entrypoint: s.Entrypoint,
		Cmd:        s.Cmd,
		Env:        append([]string{"PATH=/usr/local/bin:/usr/bin:/bin"}, s.Env...),
		User:       s.User,
		WorkingDir: s.WorkingDir,
		Labels:     s.Labels,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image %q: set config: %w", s.Name, err)
	}
	return img, nil
}

type entry struct {
	hdr    *tar.Header
	source string
}

// layerBytes writes the layer's uncompressed tar: directories then files,
// sorted by path, every header normalised (mtime epoch, uid/gid 0, no
// user/group names, PAX format without access/change times).
func layerBytes(s Spec) ([]byte, error) {
	entries := map[string]entry{}
	// addDir adds p with mode and any missing parent with 0755.
	addDir := func(p string, mode int64) {
		entries[strings.TrimPrefix(p, "/")+"/"] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(p, "/") + "/", Mode: mode}}
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			name := strings.TrimPrefix(d, "/") + "/"
			if _, ok := entries[name]; !ok {
				entries[name] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755}}
			}
		}
	}
	for _, d := range s.Dirs {
		addDir(path.Clean("/"+d), 0o755)
	}
	for _, d := range s.TmpDirs {
		addDir(path.Clean("/"+d), 0o1777)
	}
	for _, f := range s.Files {
		st, err := os.Stat(f.Source)
		if err != nil {
			return nil, fmt.Errorf("file %s: %w", f.Path, err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("file %s: source %s is not a regular file", f.Path, f.Source)
		}
		if dir := path.Dir(f.Path); dir != "/" {
			if _, ok := entries[strings.TrimPrefix(dir, "/")+"/"]; !ok {
				addDir(dir, 0o755)
			}
		}
		mode := f.Mode.Perm()
		if mode == 0 {
			mode = 0o755
		}
		name := strings.TrimPrefix(f.Path, "/")
		entries[name] = entry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: int64(mode), Size: st.Size()}, source: f.Source}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		e.hdr.ModTime = epoch
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(e.hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", n, err)
		}
		if e.source == "" {
			continue
		}
		if err := copyFile(tw, e.source, e.hdr.Size); err != nil {
			return nil, fmt.Errorf("tar %s: %w", n, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer tar: %w", err)
	}
	return buf.Bytes(), nil
}

func copyFile(w io.Writer, src string, size int64) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(w, io.LimitReader(f, size))
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("%s changed size while being read (%d of %d bytes)", src, n, size)
	}
	return nil
}

// WriteArchive writes img as an OCI image-layout tar archive to w, its
// index naming it ref ("registry/name:tag") for importers. The archive is
// byte-for-byte reproducible.
func WriteArchive(w io.Writer, img v1.Image, ref string) error {
	dir, err := os.MkdirTemp("", "tunmesh-image-")
	if err != nil {
		return fmt.Errorf("create layout dir: %w", err)
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("write image layout: %w", err)
	}
	anns := map[string]string{AnnotationContainerdName: ref}
	if tag := tagOf(ref); tag != "" {
		anns[AnnotationRefName] = tag
	}
	if err := p.AppendImage(img, layout.WithAnnotations(anns)); err != nil {
		return fmt.Errorf("write image %s to layout: %w", ref, err)
	}
	return tarDir(w, dir)
}

// tagOf returns the tag of "registry/name:tag" (a colon after the last
// slash), or "".
func tagOf(ref string) string {
	slash := strings.LastIndex(ref, "/")
	if i := strings.LastIndex(ref, ":"); i > slash {
		return ref[i+1:]
	}
	return ""
}

// tarDir archives dir's tree, sorted, with normalised headers.
func tarDir(w io.Writer, dir string) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk layout: %w", err)
	}
	sort.Strings(paths)
	tw := tar.NewWriter(w)
	for _, p := range paths {
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		hdr := &tar.Header{Name: filepath.ToSlash(rel), ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case st.IsDir():
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
		case st.Mode().IsRegular():
			hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, 0o644, st.Size()
		default:
			return fmt.Errorf("layout entry %s: unexpected file type %s", rel, st.Mode().Type())
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("archive %s: %w", rel, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			if err := copyFile(tw, p, hdr.Size); err != nil {
				return fmt.Errorf("archive %s: %w", rel, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close archive: %w", err)
	}
	return nil
}
