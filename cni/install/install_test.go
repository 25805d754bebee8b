package install

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/golden")

// goldenCases: a primary config as the CNI ships it (testdata/primary/src),
// and the file the installer leaves in its place (out in the conf dir,
// testdata/golden/<dir of src>/out).
type goldenCase struct{ src, out string }

var goldenCases = []goldenCase{
	{"10-bridge.conflist", "10-bridge.conflist"}, // reference bridge + host-local + portmap
	{"10-calico.conflist", "10-calico.conflist"}, // calico + bandwidth + portmap, 4-space indent
	{"05-cilium.conflist", "05-cilium.conflist"}, // cilium-cni, extra top-level keys, tabs
	{"10-flannel.conf", "10-flannel.conflist"},   // single plugin -> converted
	// What clusters users try first write, all cniVersion 0.3.1:
	// kind's kindnetd (its Go template rendered: ptp + portmap, tabs, blank
	// lines, a leading newline), the stock Calico and Flannel manifests'
	// cni_network_config / cni-conf.json, and GKE's containerd CNI template
	// (kubenet-style ptp + host-local) as containerd renders it.
	{"shipped/10-kindnet.conflist", "10-kindnet.conflist"},
	{"shipped/10-calico.conflist", "10-calico.conflist"},
	{"shipped/10-flannel.conflist", "10-flannel.conflist"},
	{"shipped/10-containerd-net.conflist", "10-containerd-net.conflist"},
}

// in is the case's file name in the conf dir.
func (tc goldenCase) in() string { return filepath.Base(tc.src) }

// golden is the case's expected output in testdata.
func (tc goldenCase) golden() string {
	return filepath.Join("testdata", "golden", filepath.Dir(tc.src), tc.out)
}

func TestInstallGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.src, func(t *testing.T) {
			e := newEnv(t, true)
			if err := os.WriteFile(e.conf(tc.in()), primary(t, tc.src), 0o640); err != nil {
				t.Fatal(err)
			}
			e.installer(t).reconcile()
			got := readFile(t, e.conf(tc.out))
			golden := tc.golden()
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if want := readFile(t, golden); !bytes.Equal(got, want) {
				t.Fatalf("%s:\n%s\nwant (%s):\n%s", tc.out, got, golden, want)
			}
			if err := checkPatched(got, testPluginConfig); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(e.conf(tc.out))
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o640 {
				t.Errorf("mode %v, want the original 0640", st.Mode().Perm())
			}
			if tc.in() != tc.out {
				if _, err := os.Stat(e.conf(tc.in())); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("converted %s still there: %v", tc.in(), err)
				}
			}
			ents, _ := os.ReadDir(e.cfg.ConfDir)
			if len(ents) != 1 {
				t.Errorf("conf dir holds %d files, want 1 (temporary files left?)", len(ents))
			}
		})
	}
}

func fileID(t *testing.T, path string) (uint64, time.Time) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino, st.ModTime()
}

func TestReinstallDoesNotRewrite(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.src, func(t *testing.T) {
			e := newEnv(t, true)
			e.write(t, tc.in(), primary(t, tc.src))
			e.installer(t).reconcile()
			before := readFile(t, e.conf(tc.out))
			ino, mtime := fileID(t, e.conf(tc.out))
			time.Sleep(5 * time.Millisecond)
			e.installer(t).reconcile() // a new installer: no memory of the first
			if got := readFile(t, e.conf(tc.out)); !bytes.Equal(got, before) {
				t.Fatalf("re-install changed the file:\n%s", got)
			}
			ino2, mtime2 := fileID(t, e.conf(tc.out))
			if ino2 != ino || !mtime2.Equal(mtime) {
				t.Fatalf("re-install rewrote the file: inode %d -> %d, mtime %v -> %v", ino, ino2, mtime, mtime2)
			}
		})
	}
}

func TestUninstallRestoresPrimary(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.src, func(t *testing.T) {
			e := newEnv(t, true)
			orig := primary(t, tc.src)
			e.write(t, tc.in(), orig)
			in := e.installer(t)
			mustMkdir(t, e.cfg.BinDir)
			if _, err := installBinary(e.cfg.BinSource, in.binDst); err != nil {
				t.Fatal(err)
			}
			in.reconcile()
			if err := in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			got := readFile(t, e.conf(tc.out))
			if tc.in() == tc.out {
				if !bytes.Equal(got, orig) {
					t.Fatalf("after uninstall:\n%s\nwant the original:\n%s", got, orig)
				}
			} else {
				// The converted list keeps the .conf as its only plugin.
				var list struct {
					CNIVersion, Name string
					Plugins          []map[string]any
				}
				var conf map[string]any
				if err := json.Unmarshal(got, &list); err != nil {
					t.Fatal(err)
				}
				if err := json.Unmarshal(orig, &conf); err != nil {
					t.Fatal(err)
				}
				if len(list.Plugins) != 1 || !reflect.DeepEqual(list.Plugins[0], conf) ||
					list.Name != conf["name"] || list.CNIVersion != conf["cniVersion"] {
					t.Fatalf("after uninstall:\n%s\nnot equivalent to:\n%s", got, orig)
				}
			}
			if _, err := os.Stat(in.binDst); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("binary still there: %v", err)
			}
			if err := in.Uninstall(); err != nil {
				t.Fatalf("second uninstall: %v", err)
			}
		})
	}
}

func TestUninstallKeepsBinaryWhenEntryStays(t *testing.T) {
	e := newEnv(t, true)
	e.write(t, "10-only.conflist", []byte(`{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"tunmesh-cni"}]}`))
	in := e.installer(t)
	mustMkdir(t, e.cfg.BinDir)
	if _, err := installBinary(e.cfg.BinSource, in.binDst); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err == nil {
		t.Fatal("uninstall succeeded with tunmesh-cni the only plugin")
	}
	if _, err := os.Stat(in.binDst); err != nil {
		t.Fatalf("binary removed while a config names it: %v", err)
	}
}

func TestRunWatchesAndUninstalls(t *testing.T) {
	e := newEnv(t, true)
	orig := primary(t, "10-bridge.conflist")
	path := e.conf("10-bridge.conflist")
	e.write(t, "10-bridge.conflist", orig)
	stop := e.start(t)
	waitFor(t, 5*time.Second, "first patch", func() bool { return patched(path) })
	if got := readFile(t, filepath.Join(e.cfg.BinDir, PluginType)); !bytes.Equal(got, e.bin) {
		t.Fatal("installed binary differs from the source")
	}

	// The primary CNI rewrites its file in place, without our entry.
	rewritten := bytes.Replace(orig, []byte(`"snat": true`), []byte(`"snat": false`), 1)
	e.write(t, "10-bridge.conflist", rewritten)
	waitFor(t, 2*time.Second, "re-patch after rewrite", func() bool { return patched(path) })
	if got := readFile(t, path); !bytes.Contains(got, []byte(`"snat": false`)) {
		t.Fatalf("the primary's change was lost:\n%s", got)
	}

	// The primary CNI replaces its file through a rename.
	tmp := filepath.Join(e.cfg.ConfDir, "bridge.tmp")
	if err := os.WriteFile(tmp, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "re-patch after rename", func() bool { return patched(path) })

	// Our own writes cause no loop: the file settles.
	ino, mtime := fileID(t, path)
	time.Sleep(300 * time.Millisecond)
	if ino2, mtime2 := fileID(t, path); ino2 != ino || !mtime2.Equal(mtime) {
		t.Fatal("the installer keeps rewriting its own output")
	}

	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); !bytes.Equal(got, orig) {
		t.Fatalf("after exit:\n%s\nwant the original:\n%s", got, orig)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.BinDir, PluginType)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("binary still there after exit: %v", err)
	}
}

func TestRunKeepOnExit(t *testing.T) {
	e := newEnv(t, true)
	e.cfg.KeepOnExit = true
	path := e.conf("10-calico.conflist")
	e.write(t, "10-calico.conflist", primary(t, "10-calico.conflist"))
	stop := e.start(t)
	waitFor(t, 5*time.Second, "patch", func() bool { return patched(path) })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if !patched(path) {
		t.Fatal("entry removed despite KeepOnExit")
	}
	if _, err := os.Stat(filepath.Join(e.cfg.BinDir, PluginType)); err != nil {
		t.Fatalf("binary removed despite KeepOnExit: %v", err)
	}
}

// TestRunKeepDecision: the exit decision hook keeps or removes the entry
// and the binary, and is asked after Run's context ended.
func TestRunKeepDecision(t *testing.T) {
	for _, keep := range []bool{true, false} {
		t.Run(fmt.Sprint("keep=", keep), func(t *testing.T) {
			e := newEnv(t, true)
			asked := 0
			e.cfg.Keep = func(ctx context.Context) (bool, string) {
				asked++
				if ctx.Err() != nil {
					t.Error("Keep got an ended context")
				}
				return keep, "test"
			}
			path := e.conf("10-calico.conflist")
			e.write(t, "10-calico.conflist", primary(t, "10-calico.conflist"))
			stop := e.start(t)
			waitFor(t, 5*time.Second, "patch", func() bool { return patched(path) })
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			_, errBin := os.Stat(filepath.Join(e.cfg.BinDir, PluginType))
			if asked != 1 || patched(path) != keep || (errBin == nil) != keep {
				t.Errorf("asked %d times; entry kept %v, binary: %v; want kept %v", asked, patched(path), errBin, keep)
			}
		})
	}
}

func TestRunConfDirCreatedLater(t *testing.T) {
	e := newEnv(t, false)
	e.start(t)
	time.Sleep(100 * time.Millisecond) // the installer is waiting now
	mustMkdir(t, e.cfg.ConfDir)
	time.Sleep(50 * time.Millisecond) // and watching an empty dir, or still polling
	e.write(t, "10-flannel.conf", primary(t, "10-flannel.conf"))
	waitFor(t, 3*time.Second, "patch of a late conf dir", func() bool { return patched(e.conf("10-flannel.conflist")) })

	// The dir goes away and comes back (a re-mounted hostPath).
	if err := os.RemoveAll(e.cfg.ConfDir); err != nil {
		t.Fatal(err)
	}
	mustMkdir(t, e.cfg.ConfDir)
	e.write(t, "10-bridge.conflist", primary(t, "10-bridge.conflist"))
	waitFor(t, 3*time.Second, "patch of a re-created conf dir", func() bool { return patched(e.conf("10-bridge.conflist")) })
}

func TestRunMalformedPrimary(t *testing.T) {
	e := newEnv(t, true)
	path := e.conf("10-bridge.conflist")
	broken := []byte(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge",`)
	e.write(t, "10-bridge.conflist", broken)
	ino, mtime := fileID(t, path)
	e.start(t)
	waitFor(t, 3*time.Second, "an error naming the file", func() bool {
		logs := e.logs.String()
		return strings.Contains(logs, "level=ERROR") && strings.Contains(logs, path)
	})
	time.Sleep(100 * time.Millisecond)
	if got := readFile(t, path); !bytes.Equal(got, broken) {
		t.Fatalf("malformed config was rewritten:\n%s", got)
	}
	if ino2, mtime2 := fileID(t, path); ino2 != ino || !mtime2.Equal(mtime) {
		t.Fatal("malformed config was touched")
	}
	e.write(t, "10-bridge.conflist", primary(t, "10-bridge.conflist"))
	waitFor(t, 2*time.Second, "patch once fixed", func() bool { return patched(path) })
}

func TestFirstValidConfigIsPrimary(t *testing.T) {
	e := newEnv(t, true)
	e.write(t, "00-notes.json", []byte(`not json`))
	e.write(t, ".tunmesh-install-123.tmp", []byte(`{}`))
	e.write(t, "10-calico.conflist", primary(t, "10-calico.conflist"))
	e.write(t, "20-bridge.conflist", primary(t, "10-bridge.conflist"))
	e.installer(t).reconcile()
	if !patched(e.conf("10-calico.conflist")) {
		t.Fatal("primary not patched")
	}
	if got := readFile(t, e.conf("20-bridge.conflist")); !bytes.Equal(got, primary(t, "10-bridge.conflist")) {
		t.Fatal("a secondary config was touched")
	}
	if got := readFile(t, e.conf("00-notes.json")); string(got) != "not json" {
		t.Fatal("an invalid config was touched")
	}
	if !strings.Contains(e.logs.String(), e.conf("00-notes.json")) {
		t.Fatal("the invalid config was not reported")
	}
}

func TestUnsupportedVersionPrimary(t *testing.T) {
	e := newEnv(t, true)
	// 0.2.0: a real CNI version (libcni reads it) that has no chaining.
	old := bytes.Replace(primary(t, "10-calico.conflist"), []byte(`"1.0.0"`), []byte(`"0.2.0"`), 1)
	e.write(t, "10-calico.conflist", old)
	e.write(t, "20-bridge.conflist", primary(t, "10-bridge.conflist"))
	e.installer(t).reconcile()
	if got := readFile(t, e.conf("10-calico.conflist")); !bytes.Equal(got, old) {
		t.Fatal("a 0.2.0 primary was patched")
	}
	if got := readFile(t, e.conf("20-bridge.conflist")); !bytes.Equal(got, primary(t, "10-bridge.conflist")) {
		t.Fatal("a later config was patched in the primary's stead")
	}
	if !strings.Contains(e.logs.String(), `0.2.0`) {
		t.Fatalf("unsupported version not reported:\n%s", e.logs.String())
	}
}

func TestInstallBinaryAtomic(t *testing.T) {
	e := newEnv(t, true)
	mustMkdir(t, e.cfg.BinDir)
	dst := filepath.Join(e.cfg.BinDir, PluginType)
	var old []byte // what dst holds before the rename
	calls := 0
	testHookBeforeRename = func(tmp, to string) {
		calls++
		if to != dst || filepath.Dir(tmp) != e.cfg.BinDir || !isTemp(filepath.Base(tmp)) {
			t.Errorf("temporary %q for %q: want a temporary file in %q", tmp, to, e.cfg.BinDir)
		}
		st, err := os.Stat(tmp)
		if err != nil || st.Mode().Perm() != 0o755 {
			t.Errorf("temporary file %v, %v: want mode 0755", st, err)
		}
		if got, _ := os.ReadFile(tmp); !bytes.Equal(got, e.bin) {
			t.Errorf("temporary file incomplete before rename: %d bytes", len(got))
		}
		got, err := os.ReadFile(dst)
		if old == nil && !errors.Is(err, fs.ErrNotExist) || old != nil && !bytes.Equal(got, old) {
			t.Errorf("destination changed before the rename: %d bytes, %v", len(got), err)
		}
	}
	t.Cleanup(func() { testHookBeforeRename = nil })

	check := func(wantWrote bool, wantCalls int) {
		t.Helper()
		wrote, err := installBinary(e.cfg.BinSource, dst)
		if err != nil || wrote != wantWrote || calls != wantCalls {
			t.Fatalf("installBinary = %v, %v after %d renames; want %v after %d", wrote, err, calls, wantWrote, wantCalls)
		}
		st, err := os.Stat(dst)
		if err != nil || st.Mode().Perm() != 0o755 {
			t.Fatalf("installed binary %v, %v: want mode 0755", st, err)
		}
		if got := readFile(t, dst); !bytes.Equal(got, e.bin) {
			t.Fatal("installed binary differs from the source")
		}
	}
	check(true, 1)
	check(false, 1) // same content: no write

	old = []byte("old version")
	if err := os.WriteFile(dst, old, 0o755); err != nil {
		t.Fatal(err)
	}
	check(true, 2) // upgrade: replaced through a rename
	ents, _ := os.ReadDir(e.cfg.BinDir)
	if len(ents) != 1 {
		t.Fatalf("bin dir holds %d files, want 1", len(ents))
	}
}

func TestNewChecksConfig(t *testing.T) {
	e := newEnv(t, true)
	for name, mod := range map[string]func(*Config){
		"relative bin source": func(c *Config) { c.BinSource = "tunmesh-cni" },
		"relative conf dir":   func(c *Config) { c.ConfDir = "" },
		"bad timeout":         func(c *Config) { c.PluginConfig.Timeout = "soon" },
		"relative socket":     func(c *Config) { c.PluginConfig.Socket = "cni.sock" },
		"relative log file":   func(c *Config) { c.PluginConfig.LogFile = "log" },
	} {
		cfg := e.cfg
		mod(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
	cfg := e.cfg
	cfg.PluginConfig = PluginConfig{}
	in, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if in.cfg.PluginConfig.Socket != "/var/run/tunmesh/cni.sock" || in.cfg.PluginConfig.Timeout != "10s" {
		t.Fatalf("defaults not filled: %+v", in.cfg.PluginConfig)
	}
}
