package install

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/tunmesh/tunmesh/cni/plugin"
)

// testPluginConfig is the entry the golden files hold.
var testPluginConfig = PluginConfig{
	Socket:  "/var/run/tunmesh/cni.sock",
	Timeout: "10s",
	LogFile: "/var/log/tunmesh-cni.log",
}

// lockedBuffer is a log sink safe for the installer's and the test's
// goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// env is one node's worth of directories.
type env struct {
	cfg  Config
	logs *lockedBuffer
	bin  []byte // the plugin binary's content
}

// newEnv makes a bin source, a bin dir and (if mkConfDir) a conf dir under a
// temporary root.
func newEnv(t *testing.T, mkConfDir bool) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{logs: &lockedBuffer{}, bin: bytes.Repeat([]byte("\x7fELF tunmesh-cni "), 4096)}
	e.cfg = Config{
		BinSource:      filepath.Join(root, "src", "tunmesh-cni"),
		BinDir:         filepath.Join(root, "opt", "cni", "bin"),
		ConfDir:        filepath.Join(root, "etc", "cni", "net.d"),
		PluginConfig:   testPluginConfig,
		PollInterval:   20 * time.Millisecond,
		ResyncInterval: time.Hour, // tests must pass on events alone
		Logger:         slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	mustMkdir(t, filepath.Dir(e.cfg.BinSource))
	if err := os.WriteFile(e.cfg.BinSource, e.bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if mkConfDir {
		mustMkdir(t, e.cfg.ConfDir)
	}
	return e
}

func mustMkdir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
}

func (e *env) installer(t *testing.T) *Installer {
	t.Helper()
	in, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func (e *env) conf(name string) string { return filepath.Join(e.cfg.ConfDir, name) }

func (e *env) write(t *testing.T, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(e.conf(name), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// start runs the installer until the test ends or stop is called; stop
// returns Run's error.
func (e *env) start(t *testing.T) (stop func() error) {
	t.Helper()
	in := e.installer(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("Run did not return after cancel")
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// waitFor polls try until it holds or max passes.
func waitFor(t *testing.T, max time.Duration, what string, try func() bool) {
	t.Helper()
	deadline := time.Now().Add(max)
	for !try() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", max, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func primary(t *testing.T, name string) []byte {
	t.Helper()
	return readFile(t, filepath.Join("testdata", "primary", name))
}

// patched reports whether the file at path is a conflist whose last and
// only tunmesh entry is testPluginConfig's.
func patched(path string) bool {
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	return checkPatched(data, testPluginConfig) == nil
}

// checkPatched checks data the way the runtime and the plugin read it.
func checkPatched(data []byte, pc PluginConfig) error {
	list, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return err
	}
	n := 0
	for _, p := range list.Plugins {
		if p.Network.Type == PluginType {
			n++
		}
	}
	last := list.Plugins[len(list.Plugins)-1]
	if n != 1 || last.Network.Type != PluginType {
		return errorf("want one %s entry, last; got %d, last %q", PluginType, n, last.Network.Type)
	}
	var e PluginConfig
	if err := json.Unmarshal(last.Bytes, &e); err != nil {
		return err
	}
	if e != pc {
		return errorf("entry %+v, want %+v", e, pc)
	}
	withVersion, err := json.Marshal(map[string]any{"cniVersion": list.CNIVersion, "name": list.Name, "type": PluginType,
		"socket": e.Socket, "timeout": e.Timeout, "failOpen": e.FailOpen, "logFile": e.LogFile})
	if err != nil {
		return err
	}
	if _, err := plugin.ParseConfig(withVersion); err != nil {
		return err
	}
	return nil
}

func errorf(format string, args ...any) error {
	return fmt.Errorf(format, args...)
}
