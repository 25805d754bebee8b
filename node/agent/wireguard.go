package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sync/errgroup"

	"github.com/tunmesh/tunmesh/node/wireguard"
)

// Transport names (the cluster-wide setting).
const (
	TransportTCP       = "tcp"
	TransportWireGuard = "wireguard"
)

// WireGuardConfig is the transport between nodes (docs/wireguard.md).
type WireGuardConfig struct {
	// Transport is TransportTCP (default: tunnels on the node address) or
	// TransportWireGuard (tunnels to nodes that publish a key ride a
	// userspace WireGuard overlay).
	Transport string
	// Port is the WireGuard UDP port (default 51820); MTU the overlay's
	// MTU for the mesh tunnels (default 1420; larger is faster, the
	// underlay then fragments the datagrams). Pod traffic (EncryptAll) is
	// bounded by UnderlayMTU minus WireGuard's 80 bytes instead.
	Port, MTU int
	// EncryptAll (wireguard only) carries every packet a local pod sends
	// to a pod of another WireGuard node through WireGuard too.
	EncryptAll bool
	// Required (wireguard only; strict, for after a rollout): nodes that
	// publish no WireGuard key are refused (and, with EncryptAll, their
	// pods' traffic dropped) instead of being reached on the underlay.
	Required bool
}

func (c *WireGuardConfig) check() error {
	switch c.Transport {
	case "", TransportTCP:
		if c.EncryptAll {
			return errors.New("agent config: encrypt-all needs transport wireguard")
		}
		if c.Required {
			return errors.New("agent config: wireguard-required needs transport wireguard")
		}
	case TransportWireGuard:
	default:
		return fmt.Errorf("agent config: transport %q: want %s or %s", c.Transport, TransportTCP, TransportWireGuard)
	}
	return nil
}

// newWireGuard builds the transport when configured (called by New before
// the gate is handed out: the node informer is part of it).
func (a *Agent) newWireGuard() error {
	c := a.cfg.WireGuard
	if err := c.check(); err != nil {
		return err
	}
	if c.Transport != TransportWireGuard {
		return nil
	}
	hostMTU := a.cfg.UnderlayMTU - 80
	if hostMTU < 1280 {
		return fmt.Errorf("agent config: underlay MTU %d too small for WireGuard", a.cfg.UnderlayMTU)
	}
	wg, err := wireguard.New(wireguard.Config{
		NodeName: a.cfg.NodeName, NodeIP: a.cfg.NodeIP, Port: c.Port, MTU: c.MTU, HostMTU: hostMTU, UnderlayMTU: a.cfg.UnderlayMTU,
		StateDir: a.cfg.StateDir, MeshPort: a.cfg.MeshPort, EncryptAll: c.EncryptAll, PodNetworks: a.cfg.Cluster,
		Required: c.Required,
	}, a.client, a.reg, a.log.With("component", "wireguard"))
	if err != nil {
		return err
	}
	a.wg = wg
	a.gate.Parts = append(a.gate.Parts, wg.Synced)
	if c.EncryptAll {
		// Passthrough TCP from meshed pods then rides WireGuard: clamp its
		// MSS to what fits one datagram, not the underlay's.
		a.cfg.UnderlayMTU = hostMTU
	}
	return nil
}

// wgDialTCP is the dialer's DialTCP hook: nil with transport tcp.
func (a *Agent) wgDialTCP() func(ctx context.Context, node netip.Addr, port int) (net.Conn, error) {
	if a.wg == nil {
		return nil
	}
	return a.wg.DialTCP(a.cfg.NodeIP)
}

// wgRouteOf is the dialer's RouteOf hook: nil with transport tcp.
func (a *Agent) wgRouteOf() func(node netip.Addr) string {
	if a.wg == nil {
		return nil
	}
	return a.wg.RouteOf
}

// wgAttachHost hands the host TUN to the transport (encrypt-all).
func (a *Agent) wgAttachHost(fd int) error {
	if a.wg == nil {
		return nil
	}
	return a.wg.AttachHost(fd, a.cfg.HostTUN)
}

// wgUnderlay wraps the mesh listener on the node address.
func (a *Agent) wgUnderlay(ln net.Listener) net.Listener {
	if a.wg == nil {
		return ln
	}
	return a.wg.UnderlayListener(ln)
}

// wgRun runs the transport and the mesh listener on the overlay.
func (a *Agent) wgRun(g *errgroup.Group, ctx context.Context) error {
	if a.wg == nil {
		return nil
	}
	ln, err := a.wg.ListenOverlay()
	if err != nil {
		return err
	}
	g.Go(func() error { return a.wg.Run(ctx) })
	g.Go(func() error { return a.inbound.Serve(ctx, ln) })
	return nil
}

// wgReady is the admin readiness check of the transport.
func (a *Agent) wgReady() error {
	if a.wg == nil {
		return nil
	}
	return a.wg.Ready()
}

// wgRelease removes encrypt-all routing (uninstall).
func (a *Agent) wgRelease() {
	if a.wg == nil {
		return
	}
	if err := a.wg.Release(); err != nil {
		a.log.Error("wireguard: remove encrypt-all routes", "err", err)
	}
}
