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
