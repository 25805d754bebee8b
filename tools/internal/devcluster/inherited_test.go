package devcluster

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCloexecInherited: a descriptor opened without close-on-exec (as
// flock(1) hands its lock to the command it runs) is not passed on to a
// child once cloexecInherited ran.
func TestCloexecInherited(t *testing.T) {
	fd, err := unix.Open(filepath.Join(t.TempDir(), "lock"), unix.O_CREAT|unix.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	inherited := func() bool {
		t.Helper()
		out, err := exec.Command("/bin/sh", "-c", "ls /proc/self/fd").Output()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range strings.Fields(string(out)) {
			if f == strconv.Itoa(fd) {
				return true
			}
		}
		return false
	}
	if !inherited() {
		t.Fatalf("fd %d without O_CLOEXEC was not inherited: the test cannot show anything", fd)
	}
	if err := cloexecInherited(); err != nil {
		t.Fatal(err)
	}
	if inherited() {
		t.Errorf("fd %d still inherited by a child after cloexecInherited", fd)
	}
	// Our own descriptors still work.
	if _, err := os.Stat("/proc/self/fd/" + strconv.Itoa(fd)); err != nil {
		t.Errorf("fd %d gone from this process: %v", fd, err)
	}
}
