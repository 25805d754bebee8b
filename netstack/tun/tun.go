// Package tun creates, re-opens and deletes the persistent TUN devices that
// carry a pod's cluster traffic (tm0) or the agent's passthrough traffic, each
// inside a given network namespace.
//
// Every function returns or takes a raw file descriptor (opened with
// unix.Open, never wrapped in an *os.File whose finalizer could close it while
// a reader still uses it). Devices are IFF_TUN|IFF_NO_PI: one read or write is
// exactly one IP packet.
//
// Devices are persistent (TUNSETPERSIST): closing the fd keeps the device, its
// routes and addresses, so a restarted agent re-opens it with OpenInNetns and
// the pod keeps running. Delete removes a device for good.
package tun

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Flags are the TUN flags of every device this package creates or opens.
const Flags = unix.IFF_TUN | unix.IFF_NO_PI

// MinMTU and MaxMTU bound the MTU accepted by CreateInNetns. 1280 is the
// IPv6 minimum; 65535 is the largest IP packet.
const (
	MinMTU = 1280
	MaxMTU = 65535
)

const cloneDevice = "/dev/net/tun"

// CreateInNetns creates the persistent TUN device name inside the network
// namespace at nsPath (for example /var/run/netns/x or /proc/<pid>/ns/net),
// sets its MTU, turns off IPv6 address generation on it (no link-local
// address, so the kernel sends no router solicitations or MLD reports into
// it), brings it up and returns an fd attached to it. The caller owns the fd.
//
// If a TUN device of that name already exists in the namespace (a previous
// agent made it), CreateInNetns attaches to it and applies the MTU again.
// On error nothing is left behind that this call created.
func CreateInNetns(nsPath, name string, mtu int) (fd int, err error) {
	if err := checkName(name); err != nil {
		return -1, err
	}
	if mtu < MinMTU || mtu > MaxMTU {
		return -1, fmt.Errorf("create tun %q: mtu %d outside [%d, %d]", name, mtu, MinMTU, MaxMTU)
	}
	fd = -1
	err = doInNetns(nsPath, func() error {
		_, existsErr := netlink.LinkByName(name)
		existed := existsErr == nil

		f, err := openTUN(name)
		if err != nil {
			return err
		}
		success := false
		defer func() {
			if success {
				return
			}
			if !existed {
				// Dropping persistence before the close deletes the device.
				_ = unix.IoctlSetInt(f, unix.TUNSETPERSIST, 0)
			}
			unix.Close(f)
		}()
		if err := unix.IoctlSetInt(f, unix.TUNSETPERSIST, 1); err != nil {
			return fmt.Errorf("set persist: %w", err)
		}
		link, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find link: %w", err)
		}
		if err := disableIPv6AddrGen(name); err != nil {
			return err
		}
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set mtu %d: %w", mtu, err)
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set up: %w", err)
		}
		success = true
		fd = f
		return nil
	})
	if err != nil {
		return -1, fmt.Errorf("create tun %q in netns %q: %w", name, nsPath, err)
	}
	return fd, nil
}

// OpenInNetns re-opens the existing persistent TUN device name in the network
// namespace at nsPath and returns an fd attached to it; the caller owns the
// fd. It creates nothing: if the device does not exist the error wraps
// fs.ErrNotExist.
func OpenInNetns(nsPath, name string) (fd int, err error) {
	if err := checkName(name); err != nil {
		return -1, err
	}
	fd = -1
	err = doInNetns(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			var notFound netlink.LinkNotFoundError
			if errors.As(err, &notFound) {
				return fmt.Errorf("no such device: %w", fs.ErrNotExist)
			}
			return fmt.Errorf("find link: %w", err)
		}
		if link.Type() != "tuntap" {
			return fmt.Errorf("device is a %q, not a tun", link.Type())
		}
		f, err := openTUN(name)
		if err != nil {
			return err
		}
		fd = f
		return nil
	})
	if err != nil {
		return -1, fmt.Errorf("open tun %q in netns %q: %w", name, nsPath, err)
	}
	return fd, nil
}

// Delete removes the TUN device name from the network namespace at nsPath.
// A missing namespace or device is not an error (CNI DEL must succeed twice).
func Delete(nsPath, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if _, err := os.Stat(nsPath); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	err := doInNetns(nsPath, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			var notFound netlink.LinkNotFoundError
			if errors.As(err, &notFound) {
				return nil
			}
			return fmt.Errorf("find link: %w", err)
		}
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("delete link: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete tun %q in netns %q: %w", name, nsPath, err)
	}
	return nil
}

// Info reports the name and flags of the TUN device that fd is attached to.
// It fails if fd is not a TUN/TAP fd.
func Info(fd int) (name string, flags uint16, err error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return "", 0, fmt.Errorf("tun info fd %d: %w", fd, err)
	}
	return ifr.Name(), ifr.Uint16(), nil
}

// openTUN opens the clone device and attaches the fd to name, creating the
// device if it does not exist. The device lands in the network namespace of
// the calling thread.
func openTUN(name string) (int, error) {
	fd, err := unix.Open(cloneDevice, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", cloneDevice, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(Flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("attach (TUNSETIFF): %w", err)
	}
	return fd, nil
}

// SysctlDir is the sysctl tree tunmesh writes net.* settings through.
// An unprivileged container has /proc/sys read-only; the node DaemonSet
// mounts the host's /proc/sys/net writable under another path and points
// this there (tunmesh-node --proc-sys-dir): net.* entries resolve against
// the writing thread's network namespace whichever mount they are reached
// through. Set it before creating devices.
var SysctlDir = "/proc/sys"

// disableIPv6AddrGen sets addr_gen_mode=1 (IN6_ADDR_GEN_MODE_NONE) on the
// device. The sysctl tree resolves against the calling thread's namespace. A
// kernel without IPv6 has no such file, which is fine.
func disableIPv6AddrGen(name string) error {
	p := SysctlDir + "/net/ipv6/conf/" + name + "/addr_gen_mode"
	err := os.WriteFile(p, []byte("1"), 0)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("disable ipv6 address generation: %w", err)
	}
	return nil
}

func checkName(name string) error {
	if name == "" || len(name) >= unix.IFNAMSIZ {
		return fmt.Errorf("tun name %q: must be 1 to %d bytes", name, unix.IFNAMSIZ-1)
	}
	return nil
}

// doInNetns runs fn on a locked OS thread switched into the network namespace
// at nsPath. If the thread cannot be switched back it stays locked, so the
// runtime discards it when the goroutine exits instead of reusing a thread in
// the wrong namespace.
func doInNetns(nsPath string, fn func() error) error {
	target, err := netns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer target.Close()

	errc := make(chan error, 1)
	go func() { // routineInNetns; owned by doInNetns, which waits on errc.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			// Thread stays locked and dies with this goroutine.
			errc <- errors.Join(fnErr, fmt.Errorf("leave netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}
