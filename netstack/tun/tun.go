// Package tun creates, re-opens and deletes the persistent TUN devices that
// carry a pod's cluster traffic (tm0) or the agent's passthrough traffic, each
// inside a given network namespace.
//
// Every function returns or takes a raw file descriptor (opened with
// unix.Open, never wrapped in an *os.File whose finalizer could close it while
// a reader still uses it).
//
// Devices are opened in ModeOffload: IFF_TUN|IFF_NO_PI|IFF_VNET_HDR with
// checksum and TCP segmentation offloads (TUNSETOFFLOAD TUN_F_CSUM|TSO4|TSO6).
// Every read or write is then a VnetHdr followed by one IP packet, which may
// be a TCP super-packet of up to 64 KiB that the kernel (or the reader)
// segments at gso_size, and whose TCP checksum may be left partial
// (VNET_HDR_F_NEEDS_CSUM). ModePlain (IFF_TUN|IFF_NO_PI: one read or write is
// exactly one complete IP packet) is what agents before offloads made; Info
// reports which mode an fd is in.
//
// Re-opening a persistent device with other flags is allowed by Linux: for an
// existing device TUNSETIFF replaces its feature flags (IFF_NO_PI,
// IFF_VNET_HDR, ...) with the new fd's, and only IFF_MULTI_QUEUE must match
// (drivers/net/tun.c tun_set_iff). So OpenInNetns migrates a device made by an
// older agent to ModeOffload in place: same ifindex, addresses and routes; the
// pod's existing sockets keep the route capabilities they cached (no TSO) and
// new ones use the offloads. TestOpenMigratesPlainDevice checks this on the
// running kernel. If the kernel refuses, OpenInNetns re-opens the device in
// ModePlain, and the netstack serves both modes.
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

// Flags are the TUN flags every device this package opens has; ModeOffload
// adds unix.IFF_VNET_HDR.
const Flags = unix.IFF_TUN | unix.IFF_NO_PI

// Mode is how an fd frames packets.
type Mode int

const (
	// ModePlain is IFF_TUN|IFF_NO_PI: one read or write is one complete
	// IP packet with valid checksums. Devices made by agents before
	// offloads were opened this way.
	ModePlain Mode = iota
	// ModeOffload adds IFF_VNET_HDR and TUNSETOFFLOAD (CSUM, TSO4, TSO6):
	// every read or write starts with a VnetHdr of VnetHdrLen bytes.
	ModeOffload
)

func (m Mode) String() string {
	if m == ModeOffload {
		return "offload"
	}
	return "plain"
}

// TUNSETOFFLOAD flags (linux/if_tun.h; not in x/sys/unix).
const (
	tunFCSUM = 0x01
	tunFTSO4 = 0x02
	tunFTSO6 = 0x04
	// offloads are what ModeOffload turns on. TSO_ECN is left out: only
	// connections that negotiated ECN send super-packets with CWR, pods
	// do not start ECN by default (net.ipv4.tcp_ecn=2), and without it the
	// pod's kernel segments those few itself. UDP offloads are useless:
	// the stack serves TCP only and passes UDP through.
	offloads = tunFCSUM | tunFTSO4 | tunFTSO6
)

// MinMTU and MaxMTU bound the MTU accepted by CreateInNetns. 1280 is the
// IPv6 minimum; 65535 is the largest IP packet.
const (
	MinMTU = 1280
	MaxMTU = 65535
)

const cloneDevice = "/dev/net/tun"

// CreateInNetns creates the persistent TUN device name, in ModeOffload,
// inside the network namespace at nsPath (for example /var/run/netns/x or /proc/<pid>/ns/net),
// sets its MTU, turns off IPv6 address generation on it (no link-local
// address, so the kernel sends no router solicitations or MLD reports into
// it), brings it up and returns an fd attached to it. The caller owns the fd.
//
// If a TUN device of that name already exists in the namespace (a previous
// agent made it), CreateInNetns attaches to it and applies the MTU again.
// On error nothing is left behind that this call created.
func CreateInNetns(nsPath, name string, mtu int) (fd int, err error) {
	return CreateInNetnsMode(nsPath, name, mtu, ModeOffload)
}

// CreateInNetnsMode is CreateInNetns with the mode of the returned fd (and of
// a device it creates). ModePlain exists for tests of rolling upgrades: it
// makes devices as agents before offloads did.
func CreateInNetnsMode(nsPath, name string, mtu int, mode Mode) (fd int, err error) {
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

		f, err := openTUN(name, mode)
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
//
// The fd is in ModeOffload, also for a device an older agent made in
// ModePlain (migrated in place, see the package comment); if the kernel
// refuses the new flags (EINVAL) it is re-opened in ModePlain. Info tells
// the caller which.
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
		f, err := openTUN(name, ModeOffload)
		if errors.Is(err, unix.EINVAL) {
			f, err = openTUN(name, ModePlain)
		}
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

// Info reports the name and flags (IFF_*) of the TUN device that fd is
// attached to. It fails if fd is not a TUN/TAP fd. Flags with
// unix.IFF_VNET_HDR mean ModeOffload framing (see FDMode).
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

// FDMode reports the framing of a TUN fd: ModeOffload when it was attached
// with IFF_VNET_HDR and a header of VnetHdrLen bytes, else ModePlain. Any
// other header size is an error: nothing here reads it.
func FDMode(fd int) (Mode, error) {
	_, flags, err := Info(fd)
	if err != nil {
		return ModePlain, err
	}
	if flags&unix.IFF_VNET_HDR == 0 {
		return ModePlain, nil
	}
	sz, err := unix.IoctlGetInt(fd, unix.TUNGETVNETHDRSZ)
	if err != nil {
		return ModePlain, fmt.Errorf("tun vnet header size fd %d: %w", fd, err)
	}
	if sz != VnetHdrLen {
		return ModePlain, fmt.Errorf("tun fd %d: vnet header of %d bytes, want %d", fd, sz, VnetHdrLen)
	}
	return ModeOffload, nil
}

// ClearOffloads turns the device's offloads off (TUNSETOFFLOAD 0), so that a
// reader opening it next in ModePlain (an older agent, after a rollback) gets
// complete packets with complete checksums: the offloads are a property of
// the device and survive the fd, and an older agent does not reset them.
// Call it before closing an fd a reader no longer serves. The pod's sockets
// that cached TSO are then segmented and checksummed by its kernel.
func ClearOffloads(fd int) error {
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
		return fmt.Errorf("clear tun offloads fd %d: %w", fd, err)
	}
	return nil
}

// openTUN opens the clone device and attaches the fd to name in mode,
// creating the device if it does not exist. The device lands in the network
// namespace of the calling thread.
func openTUN(name string, mode Mode) (int, error) {
	fd, err := unix.Open(cloneDevice, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", cloneDevice, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	flags := uint16(Flags)
	if mode == ModeOffload {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("attach (TUNSETIFF %s): %w", mode, err)
	}
	// The offloads are a property of the device, not of the fd: set them
	// either way, so a device re-opened in ModePlain (the fallback) never
	// hands partial checksums or super-packets to a reader without
	// headers.
	off := 0
	if mode == ModeOffload {
		if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VnetHdrLen); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("set vnet header size: %w", err)
		}
		off = offloads
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("set offloads %#x: %w", off, err)
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
