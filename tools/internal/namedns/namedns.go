// Package namedns manages named network namespaces (the files under
// /run/netns that `ip netns` uses) for the local cluster: creating and
// deleting them, running code or dialling from inside one, and finding the
// processes that live in one so that a teardown after a crash leaves nothing.
package namedns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Dir is where named namespaces are bind-mounted, as with `ip netns`.
const Dir = "/run/netns"

// Path returns the file that pins the named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// Exists reports whether the named namespace exists.
func Exists(name string) bool {
	_, err := os.Stat(Path(name))
	return err == nil
}

// Create makes a new named network namespace with loopback up. It fails if
// the name is taken: the cluster never adopts a namespace it did not make.
func Create(name string) error {
	if Exists(name) {
		return fmt.Errorf("create netns %q: %w", name, os.ErrExist)
	}
	errc := make(chan error, 1)
	// netns.NewNamed moves the calling thread into the new namespace. Do it on
	// a dedicated locked thread, move back, and let the thread die if moving
	// back fails so no goroutine ever runs in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("create netns %q: get current: %w", name, err)
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err != nil {
			if serr := netns.Set(orig); serr == nil {
				runtime.UnlockOSThread()
			}
			errc <- fmt.Errorf("create netns %q: %w", name, err)
			return
		}
		h.Close()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("create netns %q: restore thread: %w", name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return err
	}
	err := Do(name, func() error {
		lo, err := net.InterfaceByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		return setUp(lo.Index)
	})
	if err != nil {
		_ = Delete(name) // never leave a half-made namespace behind
		return fmt.Errorf("create netns %q: %w", name, err)
	}
	return nil
}

// Delete unmounts and removes the named namespace. A missing namespace is
// not an error. The namespace itself disappears once no process uses it.
func Delete(name string) error {
	p := Path(name)
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete netns %q: unmount: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete netns %q: %w", name, err)
	}
	return nil
}

// List returns the names of the namespaces whose name starts with prefix.
func List(prefix string) ([]string, error) {
	ents, err := os.ReadDir(Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list netns: %w", err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Do runs fn on a locked OS thread inside the named namespace.
func Do(name string, fn func() error) error {
	n, err := ns.GetNS(Path(name))
	if err != nil {
		return fmt.Errorf("open netns %q: %w", name, err)
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}

// DialContext opens a connection from inside the named namespace. The socket
// is created in that namespace and keeps working from any thread afterwards.
func DialContext(ctx context.Context, name, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := Do(name, func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s in netns %q: %w", addr, name, err)
	}
	return conn, nil
}

// Dialer returns a DialContext that dials from inside the named namespace,
// for http.Transport and the like.
func Dialer(name string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return DialContext(ctx, name, network, addr)
	}
}

// Listen opens a listener inside the named namespace.
func Listen(name, network, addr string) (net.Listener, error) {
	var l net.Listener
	err := Do(name, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s in netns %q: %w", addr, name, err)
	}
	return l, nil
}

// Pids returns the processes whose network namespace is the named one.
func Pids(name string) ([]int, error) {
	var st unix.Stat_t
	if err := unix.Stat(Path(name), &st); err != nil {
		return nil, fmt.Errorf("stat netns %q: %w", name, err)
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		var pst unix.Stat_t
		if unix.Stat(filepath.Join("/proc", p.Name(), "ns", "net"), &pst) != nil {
			continue // gone, or a kernel thread
		}
		if pst.Dev == st.Dev && pst.Ino == st.Ino {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// SetSysctl writes a /proc/sys/net value inside the named namespace
// (net sysctls are per namespace, resolved by the writing thread).
func SetSysctl(name, key, value string) error {
	return Do(name, func() error {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("set %s=%s in netns %q: %w", key, value, name, err)
		}
		return nil
	})
}
