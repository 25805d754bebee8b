package tun_test

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

func TestCreateOpenDelete(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	ns := nstest.NewNS(t, "tun")
	const name = "tm0"

	fd, err := tun.CreateInNetns(ns.Path, name, 9000)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })

	gotName, flags, err := tun.Info(fd)
	if err != nil {
		t.Fatal(err)
	}
	if gotName != name || flags&tun.Flags != tun.Flags {
		t.Errorf("Info = %q, %#x; want %q with %#x", gotName, flags, name, tun.Flags)
	}

	checkLink := func(wantMTU int) {
		t.Helper()
		ns.Do(t, func() error {
			link, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if got := link.Attrs().MTU; got != wantMTU {
				return fmt.Errorf("mtu = %d, want %d", got, wantMTU)
			}
			if link.Attrs().Flags&net.FlagUp == 0 {
				return errors.New("link is not up")
			}
			addrs, err := netlink.AddrList(link, netlink.FAMILY_V6)
			if err != nil {
				return err
			}
			if len(addrs) != 0 {
				return fmt.Errorf("want no IPv6 addresses (addr_gen_mode none), got %v", addrs)
			}
			return nil
		})
	}
	checkLink(9000)

	// Persistent: closing the only fd keeps the device, and it can be
	// re-opened.
	unix.Close(fd)
	fd2, err := tun.OpenInNetns(ns.Path, name)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd2)
	checkLink(9000)

	// Create on an existing device attaches and re-applies the MTU.
	fd3, err := tun.CreateInNetns(ns.Path, name, 65520)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd3)
	checkLink(65520)

	if err := tun.Delete(ns.Path, name); err != nil {
		t.Fatal(err)
	}
	if err := tun.Delete(ns.Path, name); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if err := tun.Delete("/nonexistent/netns", name); err != nil {
		t.Fatalf("delete in missing netns: %v", err)
	}
	if _, err := tun.OpenInNetns(ns.Path, name); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("open deleted tun: err = %v, want fs.ErrNotExist", err)
	}
}

func TestCreateRejects(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	ns := nstest.NewNS(t, "tunbad")
	for _, tc := range []struct {
		name string
		mtu  int
	}{
		{"", 1500},
		{"this-name-is-too-long", 1500},
		{"tm0", 100},
		{"tm0", 70000},
	} {
		if fd, err := tun.CreateInNetns(ns.Path, tc.name, tc.mtu); err == nil {
			unix.Close(fd)
			t.Errorf("CreateInNetns(%q, %d) succeeded, want error", tc.name, tc.mtu)
		}
	}
	if _, err := tun.CreateInNetns("/nonexistent/netns", "tm0", 1500); err == nil {
		t.Error("CreateInNetns in a missing netns succeeded")
	}
}

// TestOpenMigratesPlainDevice: a persistent device made without
// IFF_VNET_HDR (by an agent before offloads) is re-opened by OpenInNetns in
// ModeOffload in place: the kernel accepts the new flags on the existing
// device, which keeps its ifindex, MTU, state, addresses and routes. A
// device re-opened in ModePlain after ClearOffloads has no offloads left.
func TestOpenMigratesPlainDevice(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	ns := nstest.NewNS(t, "tunmig")
	const name = "tm0"
	fd, err := tun.CreateInNetnsMode(ns.Path, name, 9000, tun.ModePlain)
	if err != nil {
		t.Fatal(err)
	}
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModePlain {
		t.Fatalf("FDMode = %v, %v; want plain", mode, err)
	}
	type state struct {
		index, mtu int
		up         bool
		routes     int
	}
	dst := &net.IPNet{IP: net.IPv4(10, 201, 0, 0), Mask: net.CIDRMask(16, 32)}
	read := func() state {
		var st state
		ns.Do(t, func() error {
			link, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_DST)
			if err != nil {
				return err
			}
			st = state{link.Attrs().Index, link.Attrs().MTU, link.Attrs().Flags&net.FlagUp != 0, len(routes)}
			return nil
		})
		return st
	}
	ns.Do(t, func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst})
	})
	before := read()
	unix.Close(fd) // the old agent stops

	fd, err = tun.OpenInNetns(ns.Path, name)
	if err != nil {
		t.Fatal(err)
	}
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModeOffload {
		t.Fatalf("re-opened FDMode = %v, %v; want offload", mode, err)
	}
	if after := read(); after != before || before.routes != 1 || !before.up {
		t.Fatalf("device before %+v, after %+v: want it unchanged, up, with its route", before, after)
	}
	if err := tun.ClearOffloads(fd); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	fd, err = tun.CreateInNetnsMode(ns.Path, name, 9000, tun.ModePlain)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if mode, err := tun.FDMode(fd); err != nil || mode != tun.ModePlain {
		t.Fatalf("rolled back FDMode = %v, %v; want plain", mode, err)
	}
}
