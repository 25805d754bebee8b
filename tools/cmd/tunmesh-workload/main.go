// Command tunmesh-workload is a small multi-mode program that stands in for
// container images in the local cluster: a container's command
// `tunmesh-workload <mode> ...` is resolved to this binary, which then runs
// as a plain process inside the pod's network namespace.
//
// Each mode is one tiny, predictable workload that tests and demos need: TCP
// echo and HTTP servers, an HTTP caller, a one-shot TCP dialer, an iperf-like
// throughput sink and source, and exit/sleep helpers for Job and
// restart-policy tests. Run `tunmesh-workload help` for the list of modes and
// `tunmesh-workload <mode> -h` for the flags of one mode.
//
// Conventions shared by all modes:
//
//   - Positional arguments and flags may be mixed; `--` ends flag parsing.
//     Flags may be written with one or two dashes.
//   - Durations are Go durations (500ms, 2s, 1m30s) or plain seconds (5, 0.5).
//   - Output meant for the caller (response bodies, replies, JSON summaries)
//     goes to stdout; structured logs (log/slog text format, snake_case keys)
//     go to stderr.
//   - SIGTERM and SIGINT stop the workload cleanly. Servers, sleep and an
//     endless get (--count 0) then exit 0.
//   - Exit codes: 0 success, 1 failure, 2 usage error (also for help).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const progName = "tunmesh-workload"

// Process exit codes.
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

// config is the parsed command line: the selected mode and its settings.
// Only the field matching mode is meaningful.
type config struct {
	mode   string
	echo   echoConfig
	http   httpConfig
	get    getConfig
	dial   dialConfig
	sink   sinkConfig
	source sourceConfig
	exit   exitConfig
	sleep  sleepConfig
}

type echoConfig struct {
	listen string
}

type httpConfig struct {
	listen  string
	name    string // greeting name; empty means $POD_NAME or the hostname
	text    string // fixed body for GET /, used when hasText
	hasText bool
}

type getConfig struct {
	url          string
	count        int // 0 means until signalled
	interval     time.Duration
	timeout      time.Duration
	expectStatus int
}

type dialConfig struct {
	addr      string
	send      string
	expect    string // expected reply, used when hasExpect
	hasExpect bool
	timeout   time.Duration
}

type sinkConfig struct {
	listen string
}

type sourceConfig struct {
	addr     string
	bytes    int64         // total bytes across all connections; 0 means duration mode
	duration time.Duration // per-connection streaming time in duration mode
	conns    int
	timeout  time.Duration
}

type exitConfig struct {
	code    int
	after   time.Duration
	message string
}

type sleepConfig struct {
	duration time.Duration
	forever  bool
}

// env is what a running mode may use besides its config.
type env struct {
	stdout io.Writer
	log    *slog.Logger
}

// mode describes one subcommand: how to parse it and how to run it.
type mode struct {
	name     string
	synopsis string // positional arguments, shown in usage
	summary  string
	// flags registers the mode's flags on fs, bound to fields of c, and
	// sets their defaults.
	flags func(fs *flag.FlagSet, c *config)
	// check validates flags, consumes positional args into c and derives
	// remaining settings. set holds the names of the flags given explicitly.
	check func(c *config, args []string, set map[string]bool) error
	run   func(ctx context.Context, c *config, e *env) int
}

const (
	defaultTimeout = 10 * time.Second
	maxSourceConns = 1024
)

var modes = []*mode{
	{
		name:     "echo",
		synopsis: "[--listen ADDR]",
		summary:  "TCP echo server; echoes every connection's bytes back and half-closes after the client does.",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.StringVar(&c.echo.listen, "listen", ":7", "TCP `ADDR` to listen on")
		},
		check: func(c *config, args []string, _ map[string]bool) error {
			return noArgs(args)
		},
		run: func(ctx context.Context, c *config, e *env) int { return runEcho(ctx, c.echo, e) },
	},
	{
		name:     "http",
		synopsis: "[--listen ADDR] [--name NAME] [--text TEXT]",
		summary: "HTTP server. GET / greets (\"hello from NAME (pod POD ip IP)\" or --text), GET /healthz says ok,\n" +
			"GET /status/CODE answers CODE, GET /bytes/N streams N bytes. Every request is logged.",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.StringVar(&c.http.listen, "listen", ":8080", "TCP `ADDR` to listen on")
			fs.StringVar(&c.http.name, "name", "", "`NAME` used in the greeting (default $POD_NAME, else the hostname)")
			fs.StringVar(&c.http.text, "text", "", "answer GET / with `TEXT` instead of the greeting (a newline is appended if missing)")
		},
		check: func(c *config, args []string, set map[string]bool) error {
			c.http.hasText = set["text"]
			return noArgs(args)
		},
		run: func(ctx context.Context, c *config, e *env) int { return runHTTP(ctx, c.http, e) },
	},
	{
		name:     "get",
		synopsis: "URL [--count N] [--interval D] [--timeout D] [--expect-status CODE]",
		summary: "HTTP client. Sends GET requests (fresh connection each), prints every body to stdout and\n" +
			"exits 0 if all statuses matched. With --count 0 it runs until signalled, logging failures, and exits 0.",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.IntVar(&c.get.count, "count", 1, "send `N` requests; 0 repeats until signalled")
			durationVar(fs, &c.get.interval, "interval", time.Second, "pause `D` between requests")
			durationVar(fs, &c.get.timeout, "timeout", defaultTimeout, "timeout `D` for each request, body included")
			fs.IntVar(&c.get.expectStatus, "expect-status", 200, "expected HTTP status `CODE`")
		},
		check: func(c *config, args []string, _ map[string]bool) error {
			if len(args) != 1 {
				return fmt.Errorf("expected exactly one URL, got %d arguments", len(args))
			}
			u, err := normalizeURL(args[0])
			if err != nil {
				return err
			}
			c.get.url = u
			if c.get.count < 0 {
				return fmt.Errorf("--count must be >= 0, got %d", c.get.count)
			}
			if c.get.timeout <= 0 {
				return errors.New("--timeout must be > 0")
			}
			if c.get.expectStatus < 100 || c.get.expectStatus > 599 {
				return fmt.Errorf("--expect-status must be between 100 and 599, got %d", c.get.expectStatus)
			}
			return nil
		},
		run: func(ctx context.Context, c *config, e *env) int { return runGet(ctx, c.get, e) },
	},
	{
		name:     "dial",
		synopsis: "HOST:PORT [--send TEXT] [--expect TEXT] [--timeout D]",
		summary: "One-shot TCP client. Sends TEXT, half-closes, prints the whole reply to stdout and exits 0\n" +
			"if the reply equals --expect (when given) or else the sent text (echo check).",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.StringVar(&c.dial.send, "send", "ping\n", "`TEXT` to send before half-closing")
			fs.StringVar(&c.dial.expect, "expect", "", "exact reply `TEXT` to expect instead of the sent text")
			durationVar(fs, &c.dial.timeout, "timeout", defaultTimeout, "timeout `D` for the whole exchange")
		},
		check: func(c *config, args []string, set map[string]bool) error {
			addr, err := oneHostPort(args)
			if err != nil {
				return err
			}
			c.dial.addr = addr
			c.dial.hasExpect = set["expect"]
			if c.dial.timeout <= 0 {
				return errors.New("--timeout must be > 0")
			}
			return nil
		},
		run: func(ctx context.Context, c *config, e *env) int { return runDial(ctx, c.dial, e) },
	},
	{
		name:     "sink",
		synopsis: "[--listen ADDR]",
		summary: "Throughput server. Discards everything a connection sends; when the client half-closes it\n" +
			"answers one JSON line {\"bytes\":N,\"seconds\":S,\"mbytes_per_sec\":X} and closes.",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.StringVar(&c.sink.listen, "listen", ":5201", "TCP `ADDR` to listen on")
		},
		check: func(c *config, args []string, _ map[string]bool) error {
			return noArgs(args)
		},
		run: func(ctx context.Context, c *config, e *env) int { return runSink(ctx, c.sink, e) },
	},
	{
		name:     "source",
		synopsis: "HOST:PORT [--bytes N | --duration D] [--conns C] [--timeout D]",
		summary: "Throughput client for sink. Streams zeros over C parallel connections, then prints\n" +
			"{\"bytes\":N,\"seconds\":S,\"mbytes_per_sec\":X,\"conns\":C} to stdout (MiB/s, wall-clock seconds).",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.Var((*byteSizeValue)(&c.source.bytes), "bytes",
				"send `N` bytes in total, split across connections; excludes --duration (suffixes K, M, G are powers of 1024)")
			durationVar(fs, &c.source.duration, "duration", 5*time.Second,
				"stream for `D` on every connection (used unless --bytes is given)")
			fs.IntVar(&c.source.conns, "conns", 1, "use `C` parallel connections")
			durationVar(fs, &c.source.timeout, "timeout", defaultTimeout,
				"timeout `D` for connecting and for receiving the sink's summary")
		},
		check: func(c *config, args []string, set map[string]bool) error {
			addr, err := oneHostPort(args)
			if err != nil {
				return err
			}
			c.source.addr = addr
			switch {
			case set["bytes"] && set["duration"]:
				return errors.New("--bytes and --duration are mutually exclusive")
			case set["bytes"]:
				if c.source.bytes <= 0 {
					return errors.New("--bytes must be > 0")
				}
				c.source.duration = 0
			case c.source.duration <= 0:
				return errors.New("--duration must be > 0")
			}
			if c.source.conns < 1 || c.source.conns > maxSourceConns {
				return fmt.Errorf("--conns must be between 1 and %d, got %d", maxSourceConns, c.source.conns)
			}
			if c.source.timeout <= 0 {
				return errors.New("--timeout must be > 0")
			}
			return nil
		},
		run: func(ctx context.Context, c *config, e *env) int { return runSource(ctx, c.source, e) },
	},
	{
		name:     "exit",
		synopsis: "[--code N] [--after D] [--message TEXT]",
		summary: "Prints TEXT (if given) to stdout, waits D, exits with code N. A signal cuts the wait short;\n" +
			"the exit code is still N.",
		flags: func(fs *flag.FlagSet, c *config) {
			fs.IntVar(&c.exit.code, "code", 0, "exit with code `N` (0-255)")
			durationVar(fs, &c.exit.after, "after", 0, "wait `D` before exiting")
			fs.StringVar(&c.exit.message, "message", "", "`TEXT` to print to stdout first (a newline is appended if missing)")
		},
		check: func(c *config, args []string, _ map[string]bool) error {
			if c.exit.code < 0 || c.exit.code > 255 {
				return fmt.Errorf("--code must be between 0 and 255, got %d", c.exit.code)
			}
			return noArgs(args)
		},
		run: func(ctx context.Context, c *config, e *env) int { return runExit(ctx, c.exit, e) },
	},
	{
		name:     "sleep",
		synopsis: "[D]",
		summary:  "Blocks for D (forever if D is omitted or \"infinity\") or until signalled, then exits 0.",
		flags:    func(*flag.FlagSet, *config) {},
		check: func(c *config, args []string, _ map[string]bool) error {
			switch len(args) {
			case 0:
				c.sleep.forever = true
				return nil
			case 1:
			default:
				return fmt.Errorf("expected at most one duration, got %d arguments", len(args))
			}
			switch strings.ToLower(args[0]) {
			case "infinity", "inf", "forever":
				c.sleep.forever = true
				return nil
			}
			d, err := parseDuration(args[0])
			if err != nil {
				return err
			}
			c.sleep.duration = d
			return nil
		},
		run: func(ctx context.Context, c *config, e *env) int { return runSleep(ctx, c.sleep, e) },
	},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run parses args (without the program name), runs the selected mode until
// it finishes or ctx is cancelled, and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c, uerr := parseConfig(args)
	if uerr != nil {
		if uerr.err != nil {
			prefix := progName
			if uerr.mode != "" {
				prefix += " " + uerr.mode
			}
			fmt.Fprintf(stderr, "%s: %v\n\n", prefix, uerr.err)
		}
		printUsage(stderr, uerr.mode)
		return exitUsage
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil)).With("mode", c.mode)
	return findMode(c.mode).run(ctx, c, &env{stdout: stdout, log: logger})
}

// usageError reports a command line that cannot be run. mode names the
// mode whose usage should be shown ("" for the overall usage); err is nil
// when help was requested.
type usageError struct {
	mode string
	err  error
}

// parseConfig turns the command line (without the program name) into a
// config.
func parseConfig(args []string) (*config, *usageError) {
	if len(args) == 0 {
		return nil, &usageError{err: errors.New("missing mode")}
	}
	name := args[0]
	switch name {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 && findMode(args[1]) != nil {
			return nil, &usageError{mode: args[1]}
		}
		return nil, &usageError{}
	}
	m := findMode(name)
	if m == nil {
		return nil, &usageError{err: fmt.Errorf("unknown mode %q", name)}
	}
	c := &config{mode: name}
	fs := newFlagSet(m, c)
	pos, err := parseInterspersed(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return nil, &usageError{mode: name}
	}
	if err != nil {
		return nil, &usageError{mode: name, err: err}
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err := m.check(c, pos, set); err != nil {
		return nil, &usageError{mode: name, err: err}
	}
	return c, nil
}

func findMode(name string) *mode {
	for _, m := range modes {
		if m.name == name {
			return m
		}
	}
	return nil
}

// newFlagSet returns a silent flag set for m bound to c. Errors are
// returned, not printed; run prints them together with the usage.
func newFlagSet(m *mode, c *config) *flag.FlagSet {
	fs := flag.NewFlagSet(progName+" "+m.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	m.flags(fs, c)
	return fs
}

// printUsage writes the usage of the named mode, or the overall usage when
// name is empty or unknown, to w.
func printUsage(w io.Writer, name string) {
	if m := findMode(name); m != nil {
		fmt.Fprintf(w, "usage: %s %s %s\n\n%s\n", progName, m.name, m.synopsis, m.summary)
		fs := newFlagSet(m, &config{})
		var hasFlags bool
		fs.VisitAll(func(*flag.Flag) { hasFlags = true })
		if hasFlags {
			fmt.Fprintf(w, "\nflags:\n")
			fs.SetOutput(w)
			fs.PrintDefaults()
		}
		return
	}
	fmt.Fprintf(w, "usage: %s <mode> [arguments] [flags]\n\n", progName)
	fmt.Fprintf(w, "%s stands in for container images in the local cluster.\n\nmodes:\n", progName)
	for _, m := range modes {
		fmt.Fprintf(w, "  %-7s %s\n", m.name, m.synopsis)
	}
	fmt.Fprintf(w, "\nDurations (D) are Go durations (500ms, 2s, 1m) or plain seconds (5, 0.5).\n")
	fmt.Fprintf(w, "Run '%s help <mode>' or '%s <mode> -h' for details of a mode.\n", progName, progName)
}

func noArgs(args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(args, " "))
	}
	return nil
}

// oneHostPort checks that args is a single HOST:PORT address.
func oneHostPort(args []string) (string, error) {
	if len(args) != 1 {
		return "", fmt.Errorf("expected exactly one HOST:PORT, got %d arguments", len(args))
	}
	host, port, err := net.SplitHostPort(args[0])
	if err != nil {
		return "", fmt.Errorf("invalid address %q: %w", args[0], err)
	}
	if host == "" || port == "" {
		return "", fmt.Errorf("invalid address %q: want HOST:PORT", args[0])
	}
	return args[0], nil
}
