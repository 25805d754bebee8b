// Command tunmesh-bench measures tunmesh against the kernel path and an
// HAProxy mTLS sidecar pair on a local cluster it brings up and tears down
// (`make bench`), and prints a Markdown table with the ratios to the targets
// of issue #8. With --mode memory it measures the agents' memory at 100
// meshed pods and 1,000 idle meshed connections (`make bench-memory`).
//
// It is a report: a missed target is printed as MISS and the exit code
// stays 0; only errors (a cluster that does not boot, a tool that fails)
// exit non-zero. The cluster is removed at the end, also on failure and on
// Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Config is the parsed command line.
type Config struct {
	Mode     string // "perf" or "memory"
	Name     string // cluster name
	Root     string // devcluster state root ("" = its default)
	Ctl      string // tunmeshctl binary
	BootLock string // flock held while the cluster boots ("" = none)
	Keep     bool   // leave the cluster up at the end
	Out      string // also write the report here

	// perf mode
	Reps         int
	Duration     time.Duration // iperf3 -t
	RRDuration   time.Duration // sockperf -t
	ConnDuration time.Duration // hey -z
	Parallel     int           // iperf3 -P
	Clients      int           // hey -c
	MsgSize      int           // sockperf -m
	Profile      bool          // perf profile of the proxies
	// Transport is the agents' transport ("tcp" or "wireguard"); with
	// wireguard the tunmesh path rides WireGuard and a wireguard-go pair
	// with kernel TUN devices between opted-out pods is measured too.
	Transport    string
	EncryptAll   bool
	WireGuardMTU int // dev up --wireguard-mtu (0: default)

	// memory mode
	Pods    int
	Idle    int
	LimitMB float64
}

func parseFlags(args []string, stderr io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("tunmesh-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.Mode, "mode", "perf", "`perf`: throughput, latency, connections/s, CPU/GB vs kernel and HAProxy; memory: agent RSS at many pods and idle connections")
	fs.StringVar(&c.Name, "name", "bench", "local cluster `name` (must not be running)")
	fs.StringVar(&c.Root, "root", "", "local cluster state `dir` (default: tunmeshctl's)")
	fs.StringVar(&c.Ctl, "tunmeshctl", "", "tunmeshctl `binary` (default: next to this one)")
	fs.StringVar(&c.BootLock, "boot-lock", "/tmp/tunmesh-boot.lock", "`file` to flock while the cluster boots, so that clusters on one machine boot one at a time (\"\" = none)")
	fs.BoolVar(&c.Keep, "keep", false, "leave the cluster up at the end (remove it with tunmeshctl dev down --name NAME)")
	fs.StringVar(&c.Out, "out", "", "also write the report to `file`")
	fs.IntVar(&c.Reps, "reps", 5, "repetitions per path and measurement (medians are reported)")
	fs.DurationVar(&c.Duration, "duration", 5*time.Second, "iperf3 test length")
	fs.DurationVar(&c.RRDuration, "rr-duration", 3*time.Second, "sockperf ping-pong length")
	fs.DurationVar(&c.ConnDuration, "conn-duration", 3*time.Second, "hey load length")
	fs.IntVar(&c.Parallel, "parallel", 1, "iperf3 parallel streams (-P)")
	fs.IntVar(&c.Clients, "clients", 8, "hey concurrent clients (-c), each request a new connection")
	fs.IntVar(&c.MsgSize, "msg-size", 1024, "sockperf ping-pong message size, bytes")
	fs.BoolVar(&c.Profile, "profile", true, "perf mode: also profile the proxies (both agents, both HAProxys) during one more throughput run (needs perf); memory mode: list where the agents' goroutines and heap are at the last point (their /debug/pprof)")
	fs.StringVar(&c.Transport, "transport", "tcp", "agents' transport: tcp, or wireguard (adds two paths between opted-out pods: a wireguard-go pair with kernel TUN devices, and the HAProxy mTLS sidecar pair through it; needs bin/wireguard-go from make deps)")
	fs.BoolVar(&c.EncryptAll, "encrypt-all", false, "with --transport wireguard: dev up --encrypt-all")
	fs.IntVar(&c.WireGuardMTU, "wireguard-mtu", 0, "with --transport wireguard: the agents' overlay MTU (dev up --wireguard-mtu; 0: default)")
	fs.IntVar(&c.Pods, "pods", 100, "memory mode: meshed pods, spread over the two nodes")
	fs.IntVar(&c.Idle, "idle-conns", 1000, "memory mode: idle meshed connections held open, all cross-node")
	fs.Float64Var(&c.LimitMB, "limit-mb", 64, "memory mode: target agent RSS per node, MiB")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case c.Mode != "perf" && c.Mode != "memory":
		return c, fmt.Errorf("--mode %q: want perf or memory", c.Mode)
	case c.Transport != "tcp" && c.Transport != "wireguard":
		return c, fmt.Errorf("--transport %q: want tcp or wireguard", c.Transport)
	case c.EncryptAll && c.Transport != "wireguard":
		return c, errors.New("--encrypt-all needs --transport wireguard")
	case c.Name == "":
		return c, errors.New("--name must not be empty")
	case c.Reps < 1 || c.Parallel < 1 || c.Clients < 1 || c.MsgSize < 1:
		return c, errors.New("--reps, --parallel, --clients and --msg-size must be >= 1")
	case c.Duration < time.Second || c.RRDuration < time.Second || c.ConnDuration < time.Second:
		return c, errors.New("--duration, --rr-duration and --conn-duration must be >= 1s (the tools count whole seconds)")
	case c.Pods < 4 || c.Pods%4 != 0:
		return c, errors.New("--pods must be a positive multiple of 4 (half of them on each node, measured at half and all)")
	case c.Idle < 2 || c.Idle%2 != 0:
		return c, errors.New("--idle-conns must be a positive even number (measured at half and all)")
	}
	if c.Ctl == "" {
		self, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("find tunmeshctl next to this binary: %w", err)
		}
		c.Ctl = filepath.Join(filepath.Dir(self), "tunmeshctl")
	}
	return c, nil
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunmesh-bench:", err)
		os.Exit(2)
	}
	if err := run(ctx, cfg, log); err != nil {
		fmt.Fprintln(os.Stderr, "tunmesh-bench:", err)
		stop()
		os.Exit(1)
	}
}

// checkTools fails early, before a cluster boots, when a tool is missing.
func checkTools(names ...string) error {
	var missing []string
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("not in PATH: %s (run make deps)", strings.Join(missing, ", "))
	}
	return nil
}

func run(ctx context.Context, cfg Config, log *slog.Logger) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the local cluster needs root")
	}
	tools := []string{"nsenter", "tunmesh-workload"}
	if cfg.Mode == "perf" {
		tools = append(tools, "iperf3", "sockperf", "hey", "haproxy")
		if cfg.Profile {
			tools = append(tools, "perf")
		}
	}
	// The stand-in kubelet finds tunmesh-workload next to tunmeshctl; the
	// check looks there too.
	os.Setenv("PATH", os.Getenv("PATH")+string(os.PathListSeparator)+filepath.Dir(cfg.Ctl))
	if err := checkTools(tools...); err != nil {
		return err
	}
	if _, err := os.Stat(cfg.Ctl); err != nil {
		return fmt.Errorf("tunmeshctl: %w (run make build)", err)
	}
	start := time.Now()
	c, err := up(ctx, cfg, log)
	if c != nil && !cfg.Keep {
		defer func() {
			if derr := c.down(); derr != nil {
				err = errors.Join(err, derr)
			}
			log.Info("done", "wall_time", time.Since(start).Round(time.Second))
		}()
	}
	if err != nil {
		return err
	}
	var report strings.Builder
	fmt.Fprintf(&report, "tunmesh-bench --mode %s on main at commit %s, %s UTC, %s\n\n",
		cfg.Mode, commit(), time.Now().UTC().Format("2006-01-02 15:04"), machine())
	headerLen := report.Len()
	switch cfg.Mode {
	case "perf":
		err = runPerf(ctx, c, cfg, &report, log)
	case "memory":
		err = runMemory(ctx, c, cfg, &report, log)
	}
	if report.Len() > headerLen { // something measured, also on error
		fmt.Print(report.String())
		if cfg.Out != "" {
			if werr := os.WriteFile(cfg.Out, []byte(report.String()), 0o644); werr != nil {
				err = errors.Join(err, fmt.Errorf("write report: %w", werr))
			}
		}
	}
	return err
}

// commit names the checkout the binaries were built from, if run inside it.
func commit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if exec.Command("git", "diff", "--quiet", "HEAD", "--", ".").Run() != nil {
		c += " (with uncommitted changes)"
	}
	return c
}

// machine describes where it ran: CPUs and load at the start.
func machine() string {
	cpus := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		cpus = strings.Count(string(b), "\nprocessor") + strings.Count(string(b)[:min(len(b), 10)], "processor")
	}
	load := "?"
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	return fmt.Sprintf("stand-in nodes on one machine, %d CPUs shared by everything, load average %s", cpus, load)
}
