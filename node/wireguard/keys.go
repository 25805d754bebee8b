package wireguard

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/sys/unix"
)

// KeyFile is the private key's file name under the agent's state
// directory. Deleting it rotates the key at the next start.
const KeyFile = "wireguard.key"

// Key is a Curve25519 key (private or public).
type Key [32]byte

// ErrBadKey is returned for keys that do not parse.
var ErrBadKey = errors.New("bad wireguard key")

// String is the base64 form used by wg(8) and in annotations.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// Hex is the form of wireguard-go's UAPI.
func (k Key) Hex() string { return hex.EncodeToString(k[:]) }

// IsZero reports the zero key.
func (k Key) IsZero() bool { return k == Key{} }

// ParseKey parses a base64 key.
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("%w: %q", ErrBadKey, s)
	}
	copy(k[:], b)
	if k.IsZero() {
		return k, fmt.Errorf("%w: zero key", ErrBadKey)
	}
	return k, nil
}

// NewPrivateKey makes a clamped Curve25519 private key.
func NewPrivateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return k, fmt.Errorf("generate wireguard key: %w", err)
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// PublicKey derives the public key of a private key.
func (k Key) PublicKey() Key {
	var pub Key
	p, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil { // only for a low-order result, impossible with the basepoint
		panic(err)
	}
	copy(pub[:], p)
	return pub
}

// LoadOrCreateKey reads the node's private key from dir/KeyFile, or makes
// one and writes it (0600, atomically) when there is none. A file that is
// there but does not parse, or that others can read, is an error: the
// agent does not silently replace (rotate) a key, nor use one that leaked.
//
// The file is opened with O_NOFOLLOW and must be a regular file owned by
// the agent's user: a symlink or someone else's file in the state
// directory is not taken as the node's identity.
func LoadOrCreateKey(dir string) (priv Key, created bool, err error) {
	path := filepath.Join(dir, KeyFile)
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	switch {
	case err == nil:
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return priv, false, fmt.Errorf("stat wireguard key: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return priv, false, fmt.Errorf("wireguard key %s: %v, want a regular file", path, fi.Mode().Type())
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return priv, false, fmt.Errorf("wireguard key %s: mode %v, want 0600", path, fi.Mode().Perm())
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
			return priv, false, fmt.Errorf("wireguard key %s: owned by uid %d, not this agent's %d", path, st.Uid, os.Geteuid())
		}
		b, err := io.ReadAll(io.LimitReader(f, 1024))
		if err != nil {
			return priv, false, fmt.Errorf("read wireguard key: %w", err)
		}
		priv, err = ParseKey(string(b))
		if err != nil {
			return priv, false, fmt.Errorf("wireguard key %s: %w", path, err)
		}
		return priv, false, nil
	case errors.Is(err, unix.ELOOP):
		return priv, false, fmt.Errorf("wireguard key %s: a symlink: %w", path, err)
	case !errors.Is(err, fs.ErrNotExist):
		return priv, false, fmt.Errorf("open wireguard key: %w", err)
	}
	if priv, err = NewPrivateKey(); err != nil {
		return priv, false, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return priv, false, fmt.Errorf("state dir for the wireguard key: %w", err)
	}
	tmp, err := os.CreateTemp(dir, KeyFile+".tmp*")
	if err != nil {
		return priv, false, fmt.Errorf("write wireguard key: %w", err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename: ENOENT, ignored
	if err := tmp.Chmod(0o600); err == nil {
		_, err = tmp.WriteString(priv.String() + "\n")
		if err == nil {
			err = tmp.Sync()
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp.Name(), path)
		}
		if err != nil {
			return priv, false, fmt.Errorf("write wireguard key: %w", err)
		}
	} else {
		tmp.Close()
		return priv, false, fmt.Errorf("write wireguard key: %w", err)
	}
	return priv, true, nil
}
