package namedns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces under " + Dir)
	}
}

func uniqueName(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "tmtest-" + hex.EncodeToString(b)
}

// newNetns creates a uniquely named namespace removed when the test ends.
func newNetns(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	name := uniqueName(t)
	t.Cleanup(func() {
		if err := Delete(name); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := Create(name); err != nil {
		t.Fatalf("Create(%q): %v", name, err)
	}
	return name
}

func readTrim(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestPath(t *testing.T) {
	if got := Path("abc"); got != "/run/netns/abc" {
		t.Errorf("Path = %q", got)
	}
}

func TestNotExisting(t *testing.T) {
	name := uniqueName(t)
	if Exists(name) {
		t.Fatalf("Exists(%q) before Create", name)
	}
	if err := Delete(name); err != nil {
		t.Errorf("Delete of a missing namespace: %v", err)
	}
	if err := Do(name, func() error { t.Error("fn ran for a missing namespace"); return nil }); err == nil {
		t.Error("Do in a missing namespace succeeded")
	}
	if _, err := Pids(name); err == nil {
		t.Error("Pids of a missing namespace succeeded")
	}
	names, err := List(name)
	if err != nil || len(names) != 0 {
		t.Errorf("List(%q) = %v, %v; want none", name, names, err)
	}
}

func TestLifecycle(t *testing.T) {
	requireRoot(t)
	name := uniqueName(t)
	t.Cleanup(func() { _ = Delete(name) })

	if err := Create(name); err != nil {
		t.Fatalf("Create: %v", err)
	}
	if !Exists(name) {
		t.Fatal("Exists false after Create")
	}
	if err := Create(name); !errors.Is(err, os.ErrExist) {
		t.Errorf("second Create = %v, want os.ErrExist", err)
	}
	names, err := List("tmtest-")
	if err != nil || !slices.Contains(names, name) {
		t.Errorf("List(tmtest-) = %v, %v; want it to contain %q", names, err, name)
	}
	names, err = List(name)
	if err != nil || !slices.Equal(names, []string{name}) {
		t.Errorf("List(%q) = %v, %v; want exactly it", name, names, err)
	}
	if names, _ := List(name + "-nope"); len(names) != 0 {
		t.Errorf("List with a longer prefix = %v, want none", names)
	}

	if err := Delete(name); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if Exists(name) {
		t.Error("Exists true after Delete")
	}
	if names, _ := List(name); len(names) != 0 {
		t.Errorf("List after Delete = %v", names)
	}
	if err := Delete(name); err != nil {
		t.Errorf("second Delete: %v", err)
	}
	// The name can be used again.
	if err := Create(name); err != nil {
		t.Errorf("Create after Delete: %v", err)
	}
}

func TestLoopbackUpAndIsolated(t *testing.T) {
	name := newNetns(t)
	var ifaces []net.Interface
	var lo *net.Interface
	err := Do(name, func() error {
		var err error
		if lo, err = net.InterfaceByName("lo"); err != nil {
			return err
		}
		ifaces, err = net.Interfaces()
		return err
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if lo.Flags&net.FlagUp == 0 {
		t.Errorf("lo flags = %v, want up", lo.Flags)
	}
	if len(ifaces) != 1 || ifaces[0].Name != "lo" {
		t.Errorf("interfaces in a fresh namespace = %v, want only lo", ifaces)
	}
	// Do runs fn in the namespace and leaves the process where it was.
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var inside string
	if err := Do(name, func() error {
		var err error
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == hostNS {
		t.Errorf("Do ran in the caller's namespace %s", inside)
	}
	if after, _ := os.Readlink("/proc/self/ns/net"); after != hostNS {
		t.Errorf("process namespace changed: %s -> %s", hostNS, after)
	}
}

func TestDoReturnsError(t *testing.T) {
	name := newNetns(t)
	sentinel := errors.New("boom")
	if err := Do(name, func() error { return sentinel }); !errors.Is(err, sentinel) {
		t.Errorf("Do = %v, want the fn's error", err)
	}
}

func TestSetSysctl(t *testing.T) {
	name := newNetns(t)
	const p = "/proc/sys/net/ipv4/ip_forward"
	host := readTrim(t, p)
	t.Cleanup(func() {
		if got := readTrim(t, p); got != host {
			t.Errorf("host ip_forward changed to %s; restoring %s", got, host)
			_ = os.WriteFile(p, []byte(host), 0o644)
		}
	})
	// Both values, so that the check means something whatever the host has.
	for _, v := range []string{"1", "0", "1"} {
		if err := SetSysctl(name, "net.ipv4.ip_forward", v); err != nil {
			t.Fatalf("SetSysctl(%s): %v", v, err)
		}
		var inside string
		if err := Do(name, func() error {
			b, err := os.ReadFile(p)
			inside = strings.TrimSpace(string(b))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if inside != v {
			t.Errorf("ip_forward inside = %s, want %s", inside, v)
		}
		if got := readTrim(t, p); got != host {
			t.Errorf("host ip_forward = %s after setting %s inside, want unchanged %s", got, v, host)
		}
	}
	if err := SetSysctl(name, "net.ipv4.tmtest_no_such_key", "1"); err == nil {
		t.Error("SetSysctl of a missing key succeeded")
	}
	if err := SetSysctl(uniqueName(t), "net.ipv4.ip_forward", "1"); err == nil {
		t.Error("SetSysctl in a missing namespace succeeded")
	}
}

func TestListenAndDialInside(t *testing.T) {
	name := newNetns(t)
	l, err := Listen(name, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	addr := l.Addr().String()

	accepted := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			accepted <- err
			return
		}
		defer c.Close()
		_, err = io.WriteString(c, "hello from "+name)
		accepted <- err
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := DialContext(ctx, name, "tcp", addr)
	if err != nil {
		t.Fatalf("DialContext inside: %v", err)
	}
	// The socket keeps working from whatever thread reads it.
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	conn.Close()
	if err != nil || string(b) != "hello from "+name {
		t.Errorf("read %q, %v", b, err)
	}
	if err := <-accepted; err != nil {
		t.Errorf("accept/write: %v", err)
	}

	// The host's loopback is another one: nothing listens there.
	var d net.Dialer
	hc, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		hc.Close()
		t.Errorf("dialing %s from the host namespace succeeded", addr)
	}

	// And a listener on the host is not reachable from inside.
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	if c, err := DialContext(ctx, name, "tcp", hl.Addr().String()); err == nil {
		c.Close()
		t.Errorf("dialing the host listener %s from inside succeeded", hl.Addr())
	} else if !strings.Contains(err.Error(), name) {
		t.Errorf("dial error %q does not name the namespace", err)
	}

	if _, err := Listen(uniqueName(t), "tcp", "127.0.0.1:0"); err == nil {
		t.Error("Listen in a missing namespace succeeded")
	}
}

func TestPids(t *testing.T) {
	name := newNetns(t)
	pids, err := Pids(name)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 0 {
		t.Errorf("Pids of a fresh namespace = %v, want none", pids)
	}

	cmd := exec.Command("nsenter", "--net="+Path(name), "--", "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nsenter: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	pid := cmd.Process.Pid
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids, err = Pids(name)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(pids, pid) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Pids = %v, never contained sleep's pid %d", pids, pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if slices.Contains(pids, os.Getpid()) {
		t.Errorf("Pids = %v contains the test process %d", pids, os.Getpid())
	}
	if len(pids) != 1 {
		t.Errorf("Pids = %v, want only %d", pids, pid)
	}
	if comm := readTrim(t, "/proc/"+strconv.Itoa(pid)+"/comm"); comm != "sleep" {
		t.Errorf("pid %d is %q, want sleep (nsenter execs it)", pid, comm)
	}

	// Another namespace does not see it.
	other := newNetns(t)
	if pids, err := Pids(other); err != nil || len(pids) != 0 {
		t.Errorf("Pids(other) = %v, %v; want none", pids, err)
	}

	// Deleting the name leaves the process running in the now anonymous
	// namespace.
	if err := Delete(name); err != nil {
		t.Fatal(err)
	}
	if _, err := Pids(name); err == nil {
		t.Error("Pids after Delete succeeded")
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Errorf("sleep gone after Delete: %v", err)
	}
}

// A leftover file that is not a mount (a crash between creating the file and
// mounting on it) counts as taken and is removed by Delete.
func TestDeletePlainFile(t *testing.T) {
	requireRoot(t)
	name := uniqueName(t)
	if err := os.MkdirAll(Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(Path(name), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(Path(name)) })
	if !Exists(name) {
		t.Fatal("Exists false for a leftover file")
	}
	if err := Create(name); !errors.Is(err, os.ErrExist) {
		t.Errorf("Create over a leftover file = %v, want os.ErrExist", err)
	}
	if err := Delete(name); err != nil {
		t.Fatalf("Delete of a leftover file: %v", err)
	}
	if Exists(name) {
		t.Error("leftover file still there after Delete")
	}
}
