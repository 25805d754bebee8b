package install

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tempPattern names the installer's temporary files. They start with a dot
// and end in ".tmp", so neither the runtime (which reads *.conf, *.conflist,
// *.json) nor the installer takes them for configs.
const tempPattern = ".tunmesh-install-*.tmp"

// isTemp reports whether name is one of our temporary files.
func isTemp(name string) bool {
	return strings.HasPrefix(name, ".tunmesh-install-") && strings.HasSuffix(name, ".tmp")
}

// errChanged reports that a file changed between our read and our rename:
// the write is dropped and the caller retries with the new content.
var errChanged = errors.New("changed while being patched")

// testHookBeforeRename, if set (by tests), runs after a temporary file is
// complete and before it is renamed over dst.
var testHookBeforeRename func(tmp, dst string)

// writeAtomic writes data to path through a temporary file in the same
// directory (written, chmod'ed to mode, fsync'ed, renamed, directory
// fsync'ed), so readers see the old or the new content, never a part.
//
// If guard is not empty, it is the path whose content must still be
// guardData just before the rename; otherwise the write is dropped with
// errChanged (a primary CNI rewrote its file meanwhile).
func writeAtomic(path string, data []byte, mode fs.FileMode, guard string, guardData []byte) (err error) {
	return writeAtomicFrom(path, bytes.NewReader(data), mode, guard, guardData)
}

func writeAtomicFrom(path string, r io.Reader, mode fs.FileMode, guard string, guardData []byte) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return fmt.Errorf("create temporary file in %q: %w", dir, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := io.Copy(f, r); err != nil {
		return fmt.Errorf("write %q: %w", tmp, err)
	}
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %q: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %q: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %q: %w", tmp, err)
	}
	if guard != "" {
		cur, err := os.ReadFile(guard)
		if err != nil || !bytes.Equal(cur, guardData) {
			return fmt.Errorf("write %q: %q %w", path, guard, errChanged)
		}
	}
	if testHookBeforeRename != nil {
		testHookBeforeRename(tmp, path)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %q to %q: %w", tmp, path, err)
	}
	syncDir(dir)
	return nil
}

// syncDir makes a rename in dir durable; failures only cost durability.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// installBinary copies src to dst atomically with mode 0755, unless dst
// already has the same content and mode. It reports whether it wrote.
func installBinary(src, dst string) (bool, error) {
	in, err := os.Open(src)
	if err != nil {
		return false, fmt.Errorf("open plugin binary: %w", err)
	}
	defer in.Close()
	h := sha256.New()
	if _, err := io.Copy(h, in); err != nil {
		return false, fmt.Errorf("read plugin binary %q: %w", src, err)
	}
	want := h.Sum(nil)
	if st, err := os.Stat(dst); err == nil && st.Mode().Perm() == 0o755 && st.Mode().IsRegular() {
		if got, err := hashFile(dst); err == nil && bytes.Equal(got, want) {
			return false, nil
		}
	}
	if _, err := in.Seek(0, io.SeekStart); err != nil {
		return false, fmt.Errorf("read plugin binary %q: %w", src, err)
	}
	if err := writeAtomicFrom(dst, in, 0o755, "", nil); err != nil {
		return false, fmt.Errorf("install plugin binary: %w", err)
	}
	return true, nil
}

func hashFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}
