package wireguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

// AttachHost gives the transport the agent's host TUN (fd and device name
// in the node's namespace) for encrypt-all: decrypted packets for local
// pods are written to it (the kernel delivers them through the primary
// CNI), and packets the kernel routes into it (peer pod CIDRs, routes.go)
// are read and encrypted. The agent keeps ownership of fd. Without
// EncryptAll it does nothing.
//
// The device's offloads are turned off so the kernel hands it only
// complete, checksummed packets of at most its MTU (writes to it may
// still carry offloads).
func (t *Transport) AttachHost(fd int, name string) error {
	if t.routes == nil {
		return nil
	}
	if err := tun.ClearOffloads(fd); err != nil {
		return fmt.Errorf("encrypt-all host tun: %w", err)
	}
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("encrypt-all host tun %q: %w", name, err)
	}
	t.hostMu.Lock()
	t.hostFD = fd
	t.hostMu.Unlock()
	t.hostOnce.Do(func() { close(t.hostReady) })
	w := netstack.FDWriter(fd)
	t.tun.SetHost(w.WritePacket, func(dst netip.Addr) bool {
		for _, c := range t.peers.LocalPodCIDRs() {
			if c.Contains(dst) {
				return true
			}
		}
		return false
	})
	t.routes.attach(ifi.Index)
	return nil
}

// Release removes the encrypt-all rules and routes (uninstall: the pods
// are released from the mesh and talk on the primary CNI's path).
func (t *Transport) Release() error {
	if t.routes == nil {
		return nil
	}
	return t.routes.release()
}

// readHost reads packets the kernel routed into the host TUN and queues
// them for encryption, until ctx ends. It polls so that it notices ctx
// without owning (closing) the fd.
func (t *Transport) readHost(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-t.hostReady:
	}
	t.hostMu.Lock()
	fd := t.hostFD
	t.hostMu.Unlock()
	w := netstack.FDWriter(fd)
	buf := make([]byte, tun.VnetHdrLen+65535)
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for ctx.Err() == nil {
		n, err := unix.Poll(pfd, 200)
		if err != nil && !errors.Is(err, unix.EINTR) {
			t.log.Error("encrypt-all: poll host tun", "err", err)
			return
		}
		if n == 0 {
			continue
		}
		for {
			m, err := unix.Read(fd, buf)
			if err != nil {
				if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
					t.log.Error("encrypt-all: read host tun", "err", err)
					return
				}
				break
			}
			if m <= tun.VnetHdrLen {
				break
			}
			h, err := tun.DecodeVnetHdr(buf[:m])
			if err != nil || h.GSOType != 0 || h.Flags&1 != 0 { // 1: VIRTIO_NET_HDR_F_NEEDS_CSUM
				t.tun.dropped.Add(1) // offloads are off: not expected
			} else {
				pkt := buf[tun.VnetHdrLen:m]
				clampSYN(pkt, t.cfg.HostMTU)
				if icmp := fragNeeded(pkt, t.cfg.HostMTU); icmp != nil {
					// Too big for one datagram and not to be
					// fragmented: tell the pod, as a router would.
					t.tun.tooBig.Add(1)
					if err := w.WritePacket(icmp); err != nil {
						t.tun.dropped.Add(1)
					}
				} else {
					t.tun.SendHost(pkt)
				}
			}
			// One packet per poll wake-up unless more are ready.
			if p, _ := unix.Poll(pfd, 0); p == 0 {
				break
			}
		}
	}
}
