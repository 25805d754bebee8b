package wireguard

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	k1, created, err := LoadOrCreateKey(dir)
	if err != nil || !created {
		t.Fatalf("first load: created %v err %v", created, err)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	k2, created, err := LoadOrCreateKey(dir)
	if err != nil || created || k2 != k1 {
		t.Fatalf("second load: same key %v created %v err %v", k2 == k1, created, err)
	}
	if k1.PublicKey() == k1 || k1.PublicKey() != k2.PublicKey() {
		t.Fatal("public key not derived consistently")
	}
	// Rotation: delete the file.
	if err := os.Remove(filepath.Join(dir, KeyFile)); err != nil {
		t.Fatal(err)
	}
	k3, created, err := LoadOrCreateKey(dir)
	if err != nil || !created || k3 == k1 {
		t.Fatalf("after delete: new key %v created %v err %v", k3 != k1, created, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("state dir holds %d files, want only the key (no temp files left)", len(entries))
	}
}

func TestLoadOrCreateKeyRefuses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		content string
		mode    os.FileMode
	}{
		{"garbage", "not a key\n", 0o600},
		{"short", "AAAA\n", 0o600},
		{"zero", Key{}.String(), 0o600},
		{"readable by others", mustKey(t).String(), 0o644},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, KeyFile)
			if err := os.WriteFile(p, []byte(tc.content), tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, tc.mode); err != nil {
				t.Fatal(err)
			}
			if _, _, err := LoadOrCreateKey(dir); err == nil {
				t.Fatal("accepted")
			}
			b, _ := os.ReadFile(p)
			if string(b) != tc.content {
				t.Fatal("the file was replaced: a bad key must not be rotated silently")
			}
		})
	}
}

func mustKey(t testing.TB) Key {
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestParseKey(t *testing.T) {
	k := mustKey(t)
	got, err := ParseKey(k.String())
	if err != nil || got != k {
		t.Fatalf("round trip: %v", err)
	}
	for _, s := range []string{"", "!!", "AAAA", Key{}.String(), k.String() + "AA"} {
		if _, err := ParseKey(s); !errors.Is(err, ErrBadKey) {
			t.Errorf("ParseKey(%q) = %v, want ErrBadKey", s, err)
		}
	}
}

// TestPublicKeyKnownAnswer: RFC 7748 section 6.1 (Alice).
func TestPublicKeyKnownAnswer(t *testing.T) {
	priv := hexKey(t, "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	want := hexKey(t, "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
	if got := priv.PublicKey(); got != want {
		t.Fatalf("public key %x, want %x", got, want)
	}
}

func hexKey(t *testing.T, s string) Key {
	var k Key
	for i := range k {
		var b byte
		for _, c := range s[2*i : 2*i+2] {
			b <<= 4
			switch {
			case c >= '0' && c <= '9':
				b |= byte(c - '0')
			default:
				b |= byte(c-'a') + 10
			}
		}
		k[i] = b
	}
	if k.Hex() != s {
		t.Fatalf("hex round trip %s", k.Hex())
	}
	return k
}

// TestLoadOrCreateKeyRefusesSymlinkAndStranger: a symlink in place of the
// key (even to a good key), a FIFO, or a key file owned by another user
// is refused, and left as it is.
func TestLoadOrCreateKeyRefusesSymlinkAndStranger(t *testing.T) {
	good := mustKey(t).String() + "\n"
	t.Run("symlink", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(t.TempDir(), "elsewhere.key")
		if err := os.WriteFile(target, []byte(good), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, filepath.Join(dir, KeyFile)); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreateKey(dir); err == nil {
			t.Fatal("a symlinked key was accepted")
		}
		if fi, err := os.Lstat(filepath.Join(dir, KeyFile)); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatalf("the symlink was replaced: %v %v", fi, err)
		}
	})
	t.Run("fifo", func(t *testing.T) {
		dir := t.TempDir()
		if err := syscall.Mkfifo(filepath.Join(dir, KeyFile), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreateKey(dir); err == nil {
			t.Fatal("a FIFO was accepted")
		}
	})
	t.Run("owned by another user", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to chown")
		}
		dir := t.TempDir()
		p := filepath.Join(dir, KeyFile)
		if err := os.WriteFile(p, []byte(good), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, _, err := LoadOrCreateKey(dir); err == nil {
			t.Fatal("another user's key file was accepted")
		}
	})
}
