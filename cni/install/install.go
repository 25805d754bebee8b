// Package install puts the tunmesh-cni chained plugin into a node's CNI
// configuration and takes it out again. It is the logic of the
// tunmesh-cni-install container of the node DaemonSet, which has the host's
// CNI bin and conf dirs mounted.
//
// Run copies the plugin binary into the bin dir, then keeps the primary
// conflist (the first valid config in the conf dir, by name, as container
// runtimes pick it) patched with a tunmesh-cni entry as its last plugin,
// re-patching whenever the primary CNI rewrites or replaces its file. When
// Run's context ends it removes the entry and then the binary, unless
// Config.KeepOnExit.
package install

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/plugin"
)

// PluginConfig is the tunmesh entry's own fields (see cni/plugin.Config).
// The entry is written with every field but an empty LogFile.
type PluginConfig struct {
	// Socket is the agent's unix socket. Empty means cniapi.DefaultSocket.
	Socket string `json:"socket"`
	// Timeout bounds each plugin request, as a Go duration. Empty means
	// plugin.DefaultTimeout.
	Timeout string `json:"timeout"`
	// FailOpen lets pods start unmeshed while the agent is down.
	FailOpen bool `json:"failOpen"`
	// LogFile, if set, receives the plugin's logs.
	LogFile string `json:"logFile,omitempty"`
}

// Config configures an Installer.
type Config struct {
	// BinSource is the tunmesh-cni binary to install (in the container).
	BinSource string
	// BinDir is the host's CNI bin dir; it is created if missing.
	BinDir string
	// ConfDir is the host's CNI conf dir. It may not exist yet (node
	// boot): the installer waits for it.
	ConfDir string
	// PluginConfig is written into the tunmesh entry.
	PluginConfig PluginConfig
	// KeepOnExit leaves the entry and the binary in place when Run ends
	// (upgrades: the next installer takes over without a gap).
	KeepOnExit bool
	// Keep, if set and KeepOnExit is not, decides at exit whether to keep
	// the entry and the binary, and says why (the tunmesh-cni-install
	// command keeps them while its DaemonSet still exists: a rollout or a
	// deleted pod, whose successor takes over). It gets a fresh context:
	// Run's has ended by then.
	Keep func(ctx context.Context) (keep bool, why string)
	// KeepTimeout bounds Keep. Zero means 5s.
	KeepTimeout time.Duration
	// PollInterval is how often a missing conf dir is looked for.
	// Zero means 1s.
	PollInterval time.Duration
	// ResyncInterval is how often the conf dir is re-checked without a
	// change event, a safety net for missed events. Zero means 1m.
	ResyncInterval time.Duration
	// Logger receives the installer's logs. Nil means they are dropped.
	Logger *slog.Logger
}

// debounce lets a burst of events (a primary CNI writing several files)
// settle before the conf dir is read.
const debounce = 50 * time.Millisecond

// maxRetries bounds immediate retries when a config changes under a patch.
const maxRetries = 5

// Installer installs tunmesh-cni on one node. Create it with New.
type Installer struct {
	cfg    Config
	log    *slog.Logger
	binDst string

	// reported holds, per config path, the hash of the content whose
	// problem was last logged, so a persisting problem is logged once.
	// Only Run's goroutine touches it.
	reported map[string][sha256.Size]byte
}

// New checks cfg, fills its defaults and returns an Installer. It starts
// nothing.
func New(cfg Config) (*Installer, error) {
	for _, f := range []struct{ name, val string }{
		{"BinSource", cfg.BinSource}, {"BinDir", cfg.BinDir}, {"ConfDir", cfg.ConfDir},
	} {
		if !filepath.IsAbs(f.val) {
			return nil, fmt.Errorf("invalid %s %q: not an absolute path", f.name, f.val)
		}
	}
	if cfg.PluginConfig.Socket == "" {
		cfg.PluginConfig.Socket = cniapi.DefaultSocket
	}
	if cfg.PluginConfig.Timeout == "" {
		cfg.PluginConfig.Timeout = plugin.DefaultTimeout
	}
	// Check the entry the way the plugin will read it.
	probe, err := (&conflistDoc{}).renderCompact(cfg.PluginConfig)
	if err != nil {
		return nil, err
	}
	if _, err := plugin.ParseConfig(probe); err != nil {
		return nil, fmt.Errorf("invalid plugin config: %w", err)
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = time.Minute
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Installer{
		cfg:      cfg,
		log:      log,
		binDst:   filepath.Join(cfg.BinDir, PluginType),
		reported: make(map[string][sha256.Size]byte),
	}, nil
}

// renderCompact is the entry as a standalone plugin config, for validation.
func (*conflistDoc) renderCompact(pc PluginConfig) ([]byte, error) {
	b, err := json.Marshal(struct {
		CNIVersion string `json:"cniVersion"`
		Name       string `json:"name"`
		pluginEntry
	}{"1.0.0", "probe", pluginEntry{Type: PluginType, PluginConfig: pc}})
	if err != nil {
		return nil, fmt.Errorf("encode plugin config: %w", err)
	}
	return b, nil
}

// Run installs the binary, then watches the conf dir and keeps the primary
// config patched until ctx ends; then, unless KeepOnExit or Keep says to
// keep them, it uninstalls.
// A missing conf dir or a malformed config is waited out, not an error.
// Run returns an error only if the binary cannot be installed or removed
// or the entry cannot be removed.
func (in *Installer) Run(ctx context.Context) error {
	if err := os.MkdirAll(in.cfg.BinDir, 0o755); err != nil {
		return fmt.Errorf("create bin dir: %w", err)
	}
	wrote, err := installBinary(in.cfg.BinSource, in.binDst)
	if err != nil {
		return err
	}
	in.log.Info("plugin binary installed", "bin", in.binDst, "updated", wrote)

	in.watch(ctx)

	if in.cfg.KeepOnExit {
		in.log.Info("keeping plugin installed on exit", "bin", in.binDst, "conf_dir", in.cfg.ConfDir)
		return nil
	}
	if in.cfg.Keep != nil {
		timeout := in.cfg.KeepTimeout
		if timeout <= 0 {
			timeout = 5 * time.Second
		}
		kctx, cancel := context.WithTimeout(context.Background(), timeout)
		keep, why := in.cfg.Keep(kctx)
		cancel()
		if keep {
			in.log.Info("keeping plugin installed on exit", "bin", in.binDst, "conf_dir", in.cfg.ConfDir, "reason", why)
			return nil
		}
		in.log.Info("uninstalling on exit", "reason", why)
	}
	return in.Uninstall()
}

// watch keeps the conf dir patched until ctx ends. The watch is set up
// before each first patch, so no change between the two is missed.
func (in *Installer) watch(ctx context.Context) {
	resync := time.NewTicker(in.cfg.ResyncInterval)
	defer resync.Stop()
	waiting := false
	for ctx.Err() == nil {
		w, err := newDirWatcher(in.cfg.ConfDir)
		if err != nil {
			if !waiting {
				in.log.Info("waiting for CNI conf dir", "conf_dir", in.cfg.ConfDir, "err", err)
				waiting = true
			}
			select {
			case <-ctx.Done():
			case <-time.After(in.cfg.PollInterval):
			}
			continue
		}
		waiting = false
		in.reconcile()
		in.follow(ctx, w, resync.C)
		w.Close()
	}
}

// follow re-patches on changes until ctx ends or the watched dir goes.
func (in *Installer) follow(ctx context.Context, w *dirWatcher, resync <-chan time.Time) {
	settle := time.NewTimer(debounce)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.Gone:
			in.log.Warn("CNI conf dir went away", "conf_dir", in.cfg.ConfDir)
			return
		case <-w.Changed:
			settle.Reset(debounce)
		case <-settle.C:
			in.reconcile()
		case <-resync:
			in.reconcile()
		}
	}
}

var configExts = []string{".conflist", ".conf", ".json"}

// isConfigName reports whether a runtime would read the file name as a CNI
// config (and it is not one of our temporary files).
func isConfigName(name string) bool {
	return slices.Contains(configExts, filepath.Ext(name)) && !isTemp(name)
}

// configFiles lists the config files of the conf dir, sorted by name.
func (in *Installer) configFiles() ([]string, error) {
	ents, err := os.ReadDir(in.cfg.ConfDir)
	if err != nil {
		return nil, fmt.Errorf("read conf dir: %w", err)
	}
	var files []string
	for _, e := range ents { // sorted by name
		if !isConfigName(e.Name()) {
			continue
		}
		path := filepath.Join(in.cfg.ConfDir, e.Name())
		if st, err := os.Stat(path); err != nil || !st.Mode().IsRegular() {
			continue
		}
		files = append(files, path)
	}
	return files, nil
}

// reconcile patches the primary config, retrying at once when it changes
// under the patch. Problems are logged: the next change or resync retries.
func (in *Installer) reconcile() {
	for range maxRetries {
		err := in.patchPrimary()
		if errors.Is(err, errChanged) {
			continue
		}
		if err != nil {
			in.log.Error("patch CNI config", "conf_dir", in.cfg.ConfDir, "err", err)
		}
		return
	}
	in.log.Warn("CNI config keeps changing; retrying on the next change", "conf_dir", in.cfg.ConfDir)
}

// patchPrimary finds the primary config, the first by name that is a valid
// CNI config, and patches it. Invalid configs before it are logged and left
// alone. A primary whose cniVersion tunmesh-cni does not speak is logged
// and left alone too, and no later file is patched instead.
func (in *Installer) patchPrimary() error {
	files, err := in.configFiles()
	if err != nil {
		return err
	}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // removed since the listing
			}
			return fmt.Errorf("read %q: %w", path, err)
		}
		conv := filepath.Ext(path) != ".conflist"
		list := data
		if conv {
			list, err = ConfToConflist(data)
		}
		var out []byte
		if err == nil {
			out, err = Patch(list, in.cfg.PluginConfig)
		}
		if err != nil {
			in.reportInvalid(path, data, err)
			if errors.Is(err, ErrUnsupportedVersion) {
				return nil
			}
			continue
		}
		delete(in.reported, path)
		if !conv {
			if bytes.Equal(out, data) {
				in.log.Debug("primary CNI config up to date", "file", path)
				return nil
			}
			st, err := os.Stat(path)
			if err != nil {
				return fmt.Errorf("stat %q: %w", path, err)
			}
			if err := writeAtomic(path, out, st.Mode().Perm(), path, data); err != nil {
				return err
			}
			in.log.Info("patched primary CNI config", "file", path)
			return nil
		}
		return in.convert(path, data, out)
	}
	in.log.Info("no valid CNI config yet; waiting for the primary CNI", "conf_dir", in.cfg.ConfDir)
	return nil
}

// convert writes the conflist made from the single-plugin config at path,
// then removes path: the runtime sees the old or the new config, never none.
func (in *Installer) convert(path string, data, out []byte) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat %q: %w", path, err)
	}
	dst := strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	if err := writeAtomic(dst, out, st.Mode().Perm(), path, data); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove converted config %q: %w", path, err)
	}
	syncDir(in.cfg.ConfDir)
	in.log.Info("converted primary CNI config to a conflist and patched it", "file", dst, "from", path)
	return nil
}

// reportInvalid logs a config the installer will not touch, once per
// content.
func (in *Installer) reportInvalid(path string, data []byte, err error) {
	sum := sha256.Sum256(data)
	if prev, ok := in.reported[path]; ok && prev == sum {
		return
	}
	in.reported[path] = sum
	in.log.Error("CNI config left untouched; retrying on the next change", "file", path, "err", err)
}

// Uninstall removes the tunmesh entry from every conflist in the conf dir
// and then, only if that worked, the plugin binary: no config is left
// naming a missing binary. It is safe to call when nothing is installed.
func (in *Installer) Uninstall() error {
	files, err := in.configFiles()
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	var errs []error
	for _, path := range files {
		if filepath.Ext(path) != ".conflist" {
			continue // a single-plugin config cannot hold our entry
		}
		errs = append(errs, in.unpatch(path))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uninstall: keeping %q: %w", in.binDst, err)
	}
	if err := os.Remove(in.binDst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove plugin binary: %w", err)
	}
	in.log.Info("plugin binary removed", "bin", in.binDst)
	return nil
}

func (in *Installer) unpatch(path string) error {
	for range maxRetries {
		data, err := os.ReadFile(path)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("read %q: %w", path, err)
		}
		out, found, err := Unpatch(data)
		if err != nil {
			if found {
				return fmt.Errorf("remove entry from %q: %w", path, err)
			}
			return nil // not a config the runtime would run us from
		}
		if !found {
			return nil
		}
		st, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("stat %q: %w", path, err)
		}
		err = writeAtomic(path, out, st.Mode().Perm(), path, data)
		if errors.Is(err, errChanged) {
			continue
		}
		if err != nil {
			return err
		}
		in.log.Info("removed entry from CNI config", "file", path)
		return nil
	}
	return fmt.Errorf("remove entry from %q: %w", path, errChanged)
}
