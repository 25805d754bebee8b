package images

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// testSpec writes two source files with the given mtime and returns a spec
// using them.
func testSpec(t *testing.T, mtime time.Time) Spec {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{"app": "#!binary app\n", "helper": "helper bytes"}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	return Spec{
		Name: "tunmesh-test",
		Files: []File{
			{Path: "/usr/local/bin/app", Source: filepath.Join(dir, "app")},
			{Path: "/opt/tunmesh/bin/helper", Source: filepath.Join(dir, "helper"), Mode: 0o555},
		},
		Dirs:       []string{"/var/lib/tunmesh"},
		TmpDirs:    []string{"/tmp"},
		Entrypoint: []string{"/usr/local/bin/app"},
		User:       NonRoot,
		Labels:     map[string]string{"a": "b"},
	}
}

func archive(t *testing.T, s Spec, ref string) (v1.Hash, []byte) {
	t.Helper()
	img, err := BuildFor(s, "amd64")
	if err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, img, ref); err != nil {
		t.Fatal(err)
	}
	return d, buf.Bytes()
}

// Same content, different file times and build moments: same digest and
// byte-identical archive.
func TestReproducible(t *testing.T) {
	const ref = "example.test/tunmesh/tunmesh-test:v1"
	d1, a1 := archive(t, testSpec(t, time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)), ref)
	time.Sleep(1100 * time.Millisecond) // a different wall-clock second for anything that leaks "now"
	d2, a2 := archive(t, testSpec(t, time.Now()), ref)
	if d1 != d2 {
		t.Fatalf("digests differ: %s vs %s", d1, d2)
	}
	if !bytes.Equal(a1, a2) {
		t.Fatal("archives differ byte-wise for identical content")
	}
	// Different content must change the digest (the test above is not
	// comparing constants).
	s := testSpec(t, time.Now())
	s.User = ""
	d3, _ := archive(t, s, ref)
	if d3 == d1 {
		t.Fatal("changing the user did not change the digest")
	}
}

func untar(t *testing.T, r io.Reader) map[string]*tar.Header {
	t.Helper()
	hdrs := map[string]*tar.Header{}
	tr := tar.NewReader(r)
	var order []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hdrs[h.Name] = h
		order = append(order, h.Name)
	}
	if !sort.StringsAreSorted(order) {
		t.Errorf("entries not sorted: %v", order)
	}
	return hdrs
}

func TestImageContent(t *testing.T) {
	img, err := BuildFor(testSpec(t, time.Now()), "arm64")
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "arm64" {
		t.Errorf("platform %s/%s, want linux/arm64 (ctr import filters on it)", cf.OS, cf.Architecture)
	}
	if !cf.Created.Time.Equal(time.Unix(0, 0)) {
		t.Errorf("created %s, want the epoch", cf.Created.Time)
	}
	if cf.Config.User != NonRoot || len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/usr/local/bin/app" {
		t.Errorf("config user %q entrypoint %q", cf.Config.User, cf.Config.Entrypoint)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != "application/vnd.oci.image.manifest.v1+json" || m.Config.MediaType != "application/vnd.oci.image.config.v1+json" {
		t.Errorf("media types %s / %s, want OCI", m.MediaType, m.Config.MediaType)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	hdrs := untar(t, rc)
	want := map[string]int64{
		"opt/": 0o755, "opt/tunmesh/": 0o755, "opt/tunmesh/bin/": 0o755, "opt/tunmesh/bin/helper": 0o555,
		"tmp/": 0o1777, "usr/": 0o755, "usr/local/": 0o755, "usr/local/bin/": 0o755, "usr/local/bin/app": 0o755,
		"var/": 0o755, "var/lib/": 0o755, "var/lib/tunmesh/": 0o755,
	}
	if len(hdrs) != len(want) {
		t.Errorf("layer has %d entries, want %d: %v", len(hdrs), len(want), keys(hdrs))
	}
	for name, mode := range want {
		h, ok := hdrs[name]
		if !ok {
			t.Errorf("layer lacks %s", name)
			continue
		}
		if h.Mode != mode {
			t.Errorf("%s mode %o, want %o", name, h.Mode, mode)
		}
		if !h.ModTime.Equal(time.Unix(0, 0)) || h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: mtime %s uid %d gid %d names %q/%q, want normalised", name, h.ModTime, h.Uid, h.Gid, h.Uname, h.Gname)
		}
	}
}

func keys(m map[string]*tar.Header) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// The archive is an OCI image layout whose index names the image the way
// containerd's importer reads it.
func TestArchiveLayout(t *testing.T) {
	const ref = "example.test/tunmesh/tunmesh-test:v2"
	d, a := archive(t, testSpec(t, time.Now()), ref)
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(a))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			files[h.Name] = b
		}
	}
	if _, ok := files["oci-layout"]; !ok {
		t.Fatal("no oci-layout file")
	}
	var idx v1.IndexManifest
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(idx.Manifests))
	}
	desc := idx.Manifests[0]
	if desc.Digest != d {
		t.Errorf("index digest %s, want %s", desc.Digest, d)
	}
	if desc.Annotations[AnnotationContainerdName] != ref || desc.Annotations[AnnotationRefName] != "v2" {
		t.Errorf("annotations %v", desc.Annotations)
	}
	if _, ok := files["blobs/sha256/"+d.Hex]; !ok {
		t.Error("manifest blob missing")
	}
	// Each layer blob is gzip and named by its digest.
	img, _ := BuildFor(testSpec(t, time.Now()), "amd64")
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	blob, ok := files["blobs/sha256/"+ld.Hex]
	if !ok {
		t.Fatal("layer blob missing")
	}
	if _, err := gzip.NewReader(bytes.NewReader(blob)); err != nil {
		t.Errorf("layer blob is not gzip: %v", err)
	}
}

func TestSpecValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec Spec
	}{
		{"no name", Spec{Entrypoint: []string{"/x"}}},
		{"no entrypoint", Spec{Name: "x"}},
		{"relative path", Spec{Name: "x", Entrypoint: []string{"/x"}, Files: []File{{Path: "x", Source: "/dev/null"}}}},
		{"unclean path", Spec{Name: "x", Entrypoint: []string{"/x"}, Files: []File{{Path: "/a/../x", Source: "/dev/null"}}}},
	} {
		if _, err := Build(tc.spec); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: err %v, want ErrInvalidSpec", tc.name, err)
		}
	}
	_, err := Build(Spec{Name: "x", Entrypoint: []string{"/x"}, Files: []File{{Path: "/x", Source: "/nonexistent/file"}}})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing source: err %v, want ErrNotExist", err)
	}
}

func TestRef(t *testing.T) {
	if got := Ref("ghcr.io/tunmesh/", "tunmesh-node", "v1"); got != "ghcr.io/tunmesh/tunmesh-node:v1" {
		t.Errorf("Ref = %q", got)
	}
	for ref, tag := range map[string]string{"a/b:c": "c", "localhost:5000/b": "", "localhost:5000/b:t": "t", "b": ""} {
		if got := tagOf(ref); got != tag {
			t.Errorf("tagOf(%q) = %q, want %q", ref, got, tag)
		}
	}
}

// Every tunmesh image has an entrypoint inside its own files, and only the
// agent and the CNI installer run as root.
func TestSpecs(t *testing.T) {
	root := map[string]bool{Node: true, CNI: true}
	for _, s := range Specs("/bin-dir") {
		if err := s.validate(); err != nil {
			t.Errorf("%s: %v", s.Name, err)
		}
		found := false
		for _, f := range s.Files {
			found = found || f.Path == s.Entrypoint[0]
		}
		if !found {
			t.Errorf("%s: entrypoint %s is not one of its files", s.Name, s.Entrypoint[0])
		}
		if (s.User == "") != root[s.Name] {
			t.Errorf("%s: user %q; root only for the agent and the installer", s.Name, s.User)
		}
	}
}
