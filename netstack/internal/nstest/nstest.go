// Package nstest holds test helpers for the netstack packages: uniquely named
// network namespaces removed on cleanup, running code inside a namespace,
// sysctls, injecting raw IP packets into a device, and WaitFor.
//
// Only tests import it.
package nstest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// SkipUnlessRoot skips t (or b) with a clear message when the test cannot
// create namespaces and TUN devices.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (network namespaces, TUN devices); run as root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("skipping: /dev/net/tun unavailable: %v", err)
	}
}

// NS is a named network namespace created for one test.
type NS struct {
	Name string
	Path string
}

// NewNS creates a uniquely named network namespace with lo up and removes it
// in t.Cleanup, even when the test fails.
func NewNS(t testing.TB, role string) NS {
	t.Helper()
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("tmtest-%s-%s", role, hex.EncodeToString(b[:]))
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err != nil {
			if serr := netns.Set(orig); serr == nil {
				runtime.UnlockOSThread()
			}
			errc <- err
			return
		}
		h.Close()
		if err := netns.Set(orig); err != nil {
			errc <- err // thread stays locked and is discarded
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %q: %v", name, err)
	}
	ns := NS{Name: name, Path: filepath.Join("/var/run/netns", name)}
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("delete netns %q: %v", name, err)
		}
	})
	ns.Do(t, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	return ns
}

// Do runs fn on a locked OS thread inside the namespace and fails t on error.
// Sockets created by fn live in the namespace and may be used from any
// goroutine afterwards.
func (ns NS) Do(t testing.TB, fn func() error) {
	t.Helper()
	if err := ns.Run(fn); err != nil {
		t.Fatalf("in netns %s: %v", ns.Name, err)
	}
}

// Run runs fn on a locked OS thread inside the namespace.
func (ns NS) Run(fn func() error) error {
	target, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return err
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Sysctl writes value to the sysctl key (dotted or slashed, e.g.
// "net.ipv4.ip_forward") inside the namespace.
func (ns NS) Sysctl(t testing.TB, key, value string) {
	t.Helper()
	p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	ns.Do(t, func() error { return os.WriteFile(p, []byte(value), 0) })
}

// Inject sends pkt, a complete IPv4 or IPv6 packet, out of the device ifname
// inside the namespace through an AF_PACKET socket, so the device's owner
// (for a TUN: whoever holds its fd) receives exactly these bytes.
func (ns NS) Inject(t testing.TB, ifname string, pkt []byte) {
	t.Helper()
	ns.Do(t, func() error {
		link, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		proto := uint16(unix.ETH_P_IP)
		if len(pkt) > 0 && pkt[0]>>4 == 6 {
			proto = unix.ETH_P_IPV6
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(proto)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: link.Attrs().Index}
		if err := unix.Sendto(fd, pkt, 0, sa); err != nil {
			return fmt.Errorf("sendto %s: %w", ifname, err)
		}
		return nil
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// WaitFor calls try until it returns nil or max elapses, then fails t with
// the last error.
func WaitFor(t testing.TB, max time.Duration, try func() error) {
	t.Helper()
	deadline := time.Now().Add(max)
	for {
		err := try()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", max, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// OpenFDs lists the process's open file descriptors.
func OpenFDs(t testing.TB) map[int]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	fds := make(map[int]string, len(ents))
	for _, e := range ents {
		var fd int
		if _, err := fmt.Sscan(e.Name(), &fd); err != nil {
			continue
		}
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // the fd ReadDir itself used
		}
		fds[fd] = target
	}
	return fds
}
