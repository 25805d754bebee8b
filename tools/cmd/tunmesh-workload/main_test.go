package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// runMainEnv makes the test binary behave like the real command, so tests
// can exercise main() and its signal handling in a child process.
const runMainEnv = "TUNMESH_WORKLOAD_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

const testWait = 5 * time.Second

var errTestTimeout = errors.New("test time limit")

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var listeningAddrRE = regexp.MustCompile(`msg=listening .*\baddr=(\S+)`)

// logWatch records log output and reports the address of the first
// "listening" record. slog handlers write one record per Write call.
type logWatch struct {
	syncBuffer
	once sync.Once
	addr chan string
}

func newLogWatch() *logWatch { return &logWatch{addr: make(chan string, 1)} }

func (w *logWatch) Write(p []byte) (int, error) {
	if m := listeningAddrRE.FindSubmatch(p); m != nil {
		w.once.Do(func() { w.addr <- string(m[1]) })
	}
	return w.syncBuffer.Write(p)
}

// startServer runs a server mode in-process and returns the address it
// listens on. args should listen on 127.0.0.1:0. The server is stopped at
// the end of the test and must then exit 0.
func startServer(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs := newLogWatch()
	exited := make(chan struct{})
	var code int
	go func() {
		defer close(exited)
		code = run(ctx, args, io.Discard, logs)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-exited:
			if code != exitOK {
				t.Errorf("%v: exit code %d after cancel, want 0; logs:\n%s", args, code, logs.String())
			}
		case <-time.After(testWait):
			t.Errorf("%v: did not stop within %v after cancel", args, testWait)
		}
	})
	select {
	case addr := <-logs.addr:
		return addr
	case <-exited:
		t.Fatalf("%v: exited early with code %d; logs:\n%s", args, code, logs.String())
	case <-time.After(testWait):
		t.Fatalf("%v: not listening after %v; logs:\n%s", args, testWait, logs.String())
	}
	return ""
}

type result struct {
	code   int
	stdout string
	stderr string
}

// runMode runs the command line in-process with a time limit.
func runMode(t *testing.T, args ...string) result {
	t.Helper()
	return runModeCtx(t, context.Background(), args...)
}

func runModeCtx(t *testing.T, ctx context.Context, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeoutCause(ctx, testWait, errTestTimeout)
	defer cancel()
	var stdout, stderr syncBuffer
	code := run(ctx, args, &stdout, &stderr)
	if context.Cause(ctx) == errTestTimeout {
		t.Fatalf("%v: still running after %v", args, testWait)
	}
	return result{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		args   []string
		stderr []string // substrings expected on stderr
	}{
		{"no args", nil, []string{"missing mode", "usage: tunmesh-workload <mode>"}},
		{"help", []string{"help"}, []string{"usage: tunmesh-workload <mode>", "echo", "source", "sleep"}},
		{"dash help", []string{"--help"}, []string{"usage: tunmesh-workload <mode>"}},
		{"help mode", []string{"help", "get"}, []string{"usage: tunmesh-workload get URL", "-expect-status"}},
		{"mode -h", []string{"sink", "-h"}, []string{"usage: tunmesh-workload sink", "-listen"}},
		{"unknown mode", []string{"bogus"}, []string{`unknown mode "bogus"`, "usage: tunmesh-workload <mode>"}},
		{"unknown flag", []string{"echo", "--nope"}, []string{"tunmesh-workload echo:", "nope", "usage: tunmesh-workload echo"}},
		{"extra arg", []string{"echo", "extra"}, []string{"unexpected arguments: extra"}},
		{"get without url", []string{"get"}, []string{"expected exactly one URL"}},
		{"get bad scheme", []string{"get", "ftp://x/"}, []string{"scheme must be http or https"}},
		{"get negative count", []string{"get", "127.0.0.1:1", "--count", "-1"}, []string{"--count must be >= 0"}},
		{"get bad status", []string{"get", "127.0.0.1:1", "--expect-status", "99"}, []string{"--expect-status"}},
		{"dial without addr", []string{"dial"}, []string{"expected exactly one HOST:PORT"}},
		{"dial bad addr", []string{"dial", "nocolon"}, []string{"invalid address"}},
		{"source bytes and duration", []string{"source", "127.0.0.1:1", "--bytes", "1", "--duration", "1s"}, []string{"mutually exclusive"}},
		{"source zero conns", []string{"source", "127.0.0.1:1", "--conns", "0"}, []string{"--conns"}},
		{"source bad bytes", []string{"source", "127.0.0.1:1", "--bytes", "lots"}, []string{"invalid size"}},
		{"exit code range", []string{"exit", "--code", "256"}, []string{"--code must be between 0 and 255"}},
		{"exit bad after", []string{"exit", "--after", "soon"}, []string{"invalid duration"}},
		{"sleep bad duration", []string{"sleep", "--", "-5s"}, []string{"must not be negative"}},
		{"sleep flag-like", []string{"sleep", "-5s"}, []string{"flag provided but not defined: -5s"}},
		{"sleep two args", []string{"sleep", "1", "2"}, []string{"at most one duration"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := runMode(t, tt.args...)
			if r.code != exitUsage {
				t.Errorf("exit code %d, want %d", r.code, exitUsage)
			}
			if r.stdout != "" {
				t.Errorf("stdout = %q, want empty", r.stdout)
			}
			for _, want := range tt.stderr {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("stderr does not contain %q:\n%s", want, r.stderr)
				}
			}
		})
	}
}

func TestParseConfig(t *testing.T) {
	t.Parallel()
	t.Run("defaults", func(t *testing.T) {
		c := mustParse(t, "get", "web:8080/healthz")
		want := getConfig{url: "http://web:8080/healthz", count: 1, interval: time.Second, timeout: 10 * time.Second, expectStatus: 200}
		if c.get != want {
			t.Errorf("get config = %+v, want %+v", c.get, want)
		}
		if c := mustParse(t, "echo"); c.echo.listen != ":7" {
			t.Errorf("echo listen = %q", c.echo.listen)
		}
		if c := mustParse(t, "http"); c.http.listen != ":8080" || c.http.hasText {
			t.Errorf("http config = %+v", c.http)
		}
		if c := mustParse(t, "sink"); c.sink.listen != ":5201" {
			t.Errorf("sink listen = %q", c.sink.listen)
		}
		s := mustParse(t, "source", "10.0.0.1:5201").source
		if s.duration != 5*time.Second || s.bytes != 0 || s.conns != 1 {
			t.Errorf("source config = %+v", s)
		}
		d := mustParse(t, "dial", "10.0.0.1:7").dial
		if d.send != "ping\n" || d.hasExpect {
			t.Errorf("dial config = %+v", d)
		}
		if sl := mustParse(t, "sleep").sleep; !sl.forever {
			t.Errorf("sleep config = %+v, want forever", sl)
		}
	})
	t.Run("flags around positional", func(t *testing.T) {
		c := mustParse(t, "get", "--count", "3", "http://a/", "-interval=250ms", "--timeout", "2")
		if c.get.url != "http://a/" || c.get.count != 3 || c.get.interval != 250*time.Millisecond || c.get.timeout != 2*time.Second {
			t.Errorf("get config = %+v", c.get)
		}
	})
	t.Run("double dash", func(t *testing.T) {
		c := mustParse(t, "dial", "--send", "--", "--", "h:1")
		if c.dial.send != "--" || c.dial.addr != "h:1" {
			t.Errorf("dial config = %+v", c.dial)
		}
		if _, err := parseConfig([]string{"get", "--", "http://a/", "--count", "2"}); err == nil {
			t.Error("flags after -- were parsed as flags")
		}
	})
	t.Run("explicit empty values", func(t *testing.T) {
		if c := mustParse(t, "http", "--text", ""); !c.http.hasText {
			t.Error("--text '' not recorded")
		}
		if c := mustParse(t, "dial", "h:1", "--expect="); !c.dial.hasExpect || c.dial.expect != "" {
			t.Errorf("dial config = %+v", c.dial)
		}
	})
	t.Run("source bytes", func(t *testing.T) {
		s := mustParse(t, "source", "h:1", "--bytes", "2M", "--conns", "4").source
		if s.bytes != 2<<20 || s.duration != 0 || s.conns != 4 {
			t.Errorf("source config = %+v", s)
		}
	})
	t.Run("sleep forms", func(t *testing.T) {
		if s := mustParse(t, "sleep", "infinity").sleep; !s.forever {
			t.Errorf("sleep infinity = %+v", s)
		}
		if s := mustParse(t, "sleep", "0.5").sleep; s.forever || s.duration != 500*time.Millisecond {
			t.Errorf("sleep 0.5 = %+v", s)
		}
		if s := mustParse(t, "sleep", "0").sleep; s.forever || s.duration != 0 {
			t.Errorf("sleep 0 = %+v", s)
		}
	})
}

func mustParse(t *testing.T, args ...string) *config {
	t.Helper()
	c, err := parseConfig(args)
	if err != nil {
		t.Fatalf("parseConfig(%q): mode %q: %v", args, err.mode, err.err)
	}
	return c
}

func TestParseDuration(t *testing.T) {
	t.Parallel()
	good := map[string]time.Duration{
		"0": 0, "5": 5 * time.Second, "0.25": 250 * time.Millisecond,
		"500ms": 500 * time.Millisecond, "1m30s": 90 * time.Second,
	}
	for in, want := range good {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "-1s", "NaN", "Inf", "1e300"} {
		if got, err := parseDuration(in); err == nil {
			t.Errorf("parseDuration(%q) = %v, want error", in, got)
		}
	}
}

func TestParseByteSize(t *testing.T) {
	t.Parallel()
	good := map[string]int64{
		"0": 0, "1000": 1000, "10B": 10, "4k": 4 << 10, "4KiB": 4 << 10,
		"2M": 2 << 20, "2mb": 2 << 20, "1G": 1 << 30,
	}
	for in, want := range good {
		if got, err := parseByteSize(in); err != nil || got != want {
			t.Errorf("parseByteSize(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.5M", "1T", "99999999999G"} {
		if got, err := parseByteSize(in); err == nil {
			t.Errorf("parseByteSize(%q) = %v, want error", in, got)
		}
	}
}

// TestSignals runs the real main() in a child process and checks that
// SIGTERM and SIGINT stop long-running modes with exit code 0.
func TestSignals(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		args   []string
		ready  string // log text that shows the workload is up
		signal os.Signal
		check  func(t *testing.T, addr string)
	}{
		{
			name: "echo SIGTERM", args: []string{"echo", "--listen", "127.0.0.1:0"},
			ready: "msg=listening", signal: syscall.SIGTERM,
			check: func(t *testing.T, addr string) {
				if r := runMode(t, "dial", addr); r.code != exitOK {
					t.Errorf("dial to child echo: code %d, stderr:\n%s", r.code, r.stderr)
				}
			},
		},
		{
			name: "http SIGTERM", args: []string{"http", "--listen", "127.0.0.1:0"},
			ready: "msg=listening", signal: syscall.SIGTERM,
			check: func(t *testing.T, addr string) {
				if r := runMode(t, "get", "http://"+addr+"/healthz"); r.code != exitOK || r.stdout != "ok\n" {
					t.Errorf("get child /healthz: code %d, stdout %q", r.code, r.stdout)
				}
			},
		},
		{
			name: "sink SIGINT", args: []string{"sink", "--listen", "127.0.0.1:0"},
			ready: "msg=listening", signal: syscall.SIGINT,
		},
		{
			name: "sleep SIGTERM", args: []string{"sleep"},
			ready: "sleeping until signalled", signal: syscall.SIGTERM,
		},
		{
			name: "get forever SIGTERM", args: []string{"get", "http://127.0.0.1:1/", "--count", "0", "--interval", "20ms", "--timeout", "1s"},
			ready: "request failed", signal: syscall.SIGTERM,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], tt.args...)
			// Under -race, a process sleeps 1s at exit by default; skip that.
			gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
			cmd.Env = append(os.Environ(), runMainEnv+"=1", "GORACE="+gorace)
			stderr, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill() // no-op once it has exited

			var logs syncBuffer
			ready := make(chan string, 1)
			drained := make(chan struct{})
			go func() {
				defer close(drained)
				sc := bufio.NewScanner(stderr)
				signalled := false
				for sc.Scan() {
					line := sc.Text()
					logs.Write([]byte(line + "\n"))
					if !signalled && strings.Contains(line, tt.ready) {
						signalled = true
						addr := ""
						if m := listeningAddrRE.FindStringSubmatch(line); m != nil {
							addr = m[1]
						}
						ready <- addr
					}
				}
			}()
			select {
			case addr := <-ready:
				if tt.check != nil {
					tt.check(t, addr)
				}
			case <-time.After(testWait):
				t.Fatalf("child not ready; logs:\n%s", logs.String())
			}
			if err := cmd.Process.Signal(tt.signal); err != nil {
				t.Fatal(err)
			}
			select {
			case <-drained: // stderr hits EOF when the child exits
			case <-time.After(testWait):
				cmd.Process.Kill()
				t.Fatalf("child still running %v after %v; logs:\n%s", testWait, tt.signal, logs.String())
			}
			err = cmd.Wait()
			if code := cmd.ProcessState.ExitCode(); err != nil || code != 0 {
				t.Errorf("child exit: %v (code %d), want 0; logs:\n%s", err, code, logs.String())
			}
		})
	}
}

// freeClosedPort returns a loopback address where nothing listens.
func freeClosedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
