package nsproc

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// start starts s and makes sure the process is gone when the test ends.
func start(t *testing.T, s Spec) *Process {
	t.Helper()
	p, err := Start(s)
	if err != nil {
		t.Fatalf("Start(%+v): %v", s, err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
		<-p.Done()
	})
	return p
}

func sh(script string) Spec { return Spec{Path: "sh", Args: []string{"-c", script}} }

// waitDone fails the test if p does not exit within d.
func waitDone(t *testing.T, p *Process, d time.Duration) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(d):
		t.Fatalf("process %d still running after %v", p.Pid(), d)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestExitCode(t *testing.T) {
	tests := []struct {
		script string
		want   int
	}{
		{"exit 0", 0},
		{"true", 0},
		{"exit 3", 3},
		{"exit 255", 255},
		{"kill -KILL $$", 128 + int(syscall.SIGKILL)},
		{"kill -TERM $$", 128 + int(syscall.SIGTERM)},
		{"kill -USR1 $$", 128 + int(syscall.SIGUSR1)},
	}
	for _, tt := range tests {
		t.Run(tt.script, func(t *testing.T) {
			p := start(t, sh(tt.script))
			waitDone(t, p, 5*time.Second)
			if got := p.ExitCode(); got != tt.want {
				t.Errorf("ExitCode() = %d, want %d", got, tt.want)
			}
			if got := p.ExitCode(); got != tt.want { // stable
				t.Errorf("second ExitCode() = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestSignalFromOutside(t *testing.T) {
	p := start(t, Spec{Path: "sleep", Args: []string{"30"}})
	if pgid, err := syscall.Getpgid(p.Pid()); err != nil || pgid != p.Pid() {
		t.Errorf("pgid = %d, %v; want its own group %d", pgid, err, p.Pid())
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitDone(t, p, 5*time.Second)
	if got := p.ExitCode(); got != 137 {
		t.Errorf("ExitCode() = %d, want 137", got)
	}
	// Signalling an exited process is not an error.
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Errorf("Signal after exit = %v, want nil", err)
	}
}

func TestStartErrors(t *testing.T) {
	if _, err := Start(Spec{Path: "tmtest-no-such-command"}); err == nil {
		t.Error("Start of a missing command succeeded")
	}
	if _, err := Start(Spec{Path: filepath.Join(t.TempDir(), "nothing")}); err == nil {
		t.Error("Start of a missing path succeeded")
	}
	if _, err := Start(Spec{Path: "true", Log: filepath.Join(t.TempDir(), "no", "such", "dir", "log")}); err == nil {
		t.Error("Start with an unwritable log succeeded")
	}
	if _, err := Start(Spec{Path: "true", Dir: filepath.Join(t.TempDir(), "missing")}); err == nil {
		t.Error("Start in a missing working directory succeeded")
	}
}

func TestLogEnvDir(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	if err := os.WriteFile(log, []byte("before\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	t.Setenv("TMTEST_NSPROC", "inherited")

	s := sh(`echo "out $FOO"; echo "err $FOO" >&2; pwd; echo "parent=${TMTEST_NSPROC:-unset}"`)
	s.Env = []string{"FOO=bar"}
	s.Dir = work
	s.Log = log
	p := start(t, s)
	waitDone(t, p, 5*time.Second)
	if code := p.ExitCode(); code != 0 {
		t.Fatalf("exit code %d; log:\n%s", code, readFile(t, log))
	}
	want := "before\nout bar\nerr bar\n" + work + "\nparent=unset\n"
	if got := readFile(t, log); got != want {
		t.Errorf("log =\n%q\nwant\n%q", got, want)
	}

	// Appended, and a nil Env inherits the caller's.
	s = sh(`echo "again $TMTEST_NSPROC"`)
	s.Log = log
	p = start(t, s)
	waitDone(t, p, 5*time.Second)
	if got := readFile(t, log); got != want+"again inherited\n" {
		t.Errorf("log after second run =\n%q", got)
	}

	// Without a log the output is discarded (and nothing breaks).
	p = start(t, sh("echo discarded; echo discarded >&2"))
	waitDone(t, p, 5*time.Second)
	if code := p.ExitCode(); code != 0 {
		t.Errorf("exit code %d", code)
	}
}

func TestStopIgnoringTERM(t *testing.T) {
	ready := filepath.Join(t.TempDir(), "ready")
	p := start(t, sh(`trap "" TERM; touch `+ready+`; sleep 30`))
	waitFile(t, ready)
	const grace = 300 * time.Millisecond
	t0 := time.Now()
	p.Stop(grace)
	elapsed := time.Since(t0)
	select {
	case <-p.Done():
	default:
		t.Fatal("Stop returned before the process exited")
	}
	if elapsed < grace {
		t.Errorf("Stop returned after %v, before the %v grace period", elapsed, grace)
	}
	if elapsed > grace+3*time.Second {
		t.Errorf("Stop took %v with a %v grace period", elapsed, grace)
	}
	if got := p.ExitCode(); got != 137 {
		t.Errorf("ExitCode() = %d, want 137 (SIGKILL)", got)
	}
}

func TestStopWellBehaved(t *testing.T) {
	p := start(t, Spec{Path: "sleep", Args: []string{"30"}})
	t0 := time.Now()
	p.Stop(20 * time.Second)
	if elapsed := time.Since(t0); elapsed > 2*time.Second {
		t.Errorf("Stop took %v for a process that exits on SIGTERM", elapsed)
	}
	if got := p.ExitCode(); got != 143 {
		t.Errorf("ExitCode() = %d, want 143 (SIGTERM)", got)
	}
	// Stopping again returns at once.
	t0 = time.Now()
	p.Stop(20 * time.Second)
	if elapsed := time.Since(t0); elapsed > time.Second {
		t.Errorf("second Stop took %v", elapsed)
	}
}

func TestStopExited(t *testing.T) {
	p := start(t, sh("exit 7"))
	waitDone(t, p, 5*time.Second)
	t0 := time.Now()
	p.Stop(20 * time.Second)
	if elapsed := time.Since(t0); elapsed > time.Second {
		t.Errorf("Stop of an exited process took %v", elapsed)
	}
	if got := p.ExitCode(); got != 7 {
		t.Errorf("ExitCode() = %d, want 7", got)
	}
}

// A child that ignores SIGTERM and outlives the group leader is killed too.
func TestStopKillsGroup(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "child")
	p := start(t, sh(`(trap "" TERM; exec sleep 30) & echo $! > `+pidFile+`.tmp; mv `+pidFile+`.tmp `+pidFile+`; wait`))
	waitFile(t, pidFile)
	child, err := strconv.Atoi(strings.TrimSpace(readFile(t, pidFile)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(child, syscall.SIGKILL) })
	t0 := time.Now()
	p.Stop(10 * time.Second)
	if elapsed := time.Since(t0); elapsed > 3*time.Second {
		t.Errorf("Stop took %v though the leader exits on SIGTERM", elapsed)
	}
	deadline := time.Now().Add(3 * time.Second)
	for alive(child) {
		if time.Now().After(deadline) {
			t.Fatalf("child %d of the group survived Stop", child)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func waitFile(t *testing.T, p string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(p); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", p)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	name := "tmtest-" + hex.EncodeToString(b)
	t.Cleanup(func() {
		if err := namedns.Delete(name); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := namedns.Create(name); err != nil {
		t.Fatalf("create netns: %v", err)
	}
	return name
}

func TestNetns(t *testing.T) {
	name := newNetns(t)
	log := filepath.Join(t.TempDir(), "ip.log")
	p := start(t, Spec{Netns: name, Path: "ip", Args: []string{"-o", "link"}, Log: log})
	waitDone(t, p, 5*time.Second)
	out := readFile(t, log)
	if code := p.ExitCode(); code != 0 {
		t.Fatalf("ip -o link exited %d:\n%s", code, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], ": lo: ") || !strings.Contains(lines[0], "UP") {
		t.Errorf("ip -o link in a fresh namespace:\n%s\nwant only lo, up", out)
	}

	// The pid is the command's own (nsenter execs it) and lives in the namespace.
	p = start(t, Spec{Netns: name, Path: "sleep", Args: []string{"30"}})
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids, err := namedns.Pids(name)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(pids, p.Pid()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never in namespace %s (pids %v)", p.Pid(), name, pids)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if comm := strings.TrimSpace(readFile(t, "/proc/"+strconv.Itoa(p.Pid())+"/comm")); comm != "sleep" {
		t.Errorf("pid %d runs %q, want sleep", p.Pid(), comm)
	}
	p.Stop(5 * time.Second)
	if got := p.ExitCode(); got != 143 {
		t.Errorf("ExitCode() = %d, want 143", got)
	}
}

func TestNetnsMissing(t *testing.T) {
	p := start(t, Spec{Netns: "tmtest-does-not-exist", Path: "true"})
	waitDone(t, p, 5*time.Second)
	if code := p.ExitCode(); code == 0 {
		t.Error("process in a missing namespace exited 0")
	}
}
