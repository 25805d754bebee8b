package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// DefaultPort is the WireGuard UDP port (wg(8)'s customary one).
const DefaultPort = 51820

// Config configures the transport.
type Config struct {
	NodeName string
	NodeIP   netip.Addr // published endpoint address; the overlay address derives from it
	Port     int        // UDP port (default DefaultPort)
	// MTU is the overlay's MTU: the mesh tunnels' TCP segments between
	// the agents' overlay stacks (default DefaultMTU). Larger values make
	// the tunnels much faster (fewer segments through the userspace
	// stacks) at the price of outer datagrams the underlay fragments.
	MTU int
	// HostMTU bounds the pod packets encrypt-all carries (default
	// DefaultMTU: a 1500-byte underlay minus WireGuard's overhead): TCP
	// SYNs are clamped to it and larger packets with DF are answered with
	// ICMP fragmentation needed, so pod traffic is never fragmented.
	HostMTU int
	// UnderlayMTU is the node network's MTU (default 1500): datagrams
	// larger than it are never sent in a UDP GSO batch (see nsBind).
	UnderlayMTU int
	StateDir    string // holds KeyFile
	MeshPort    int    // the mesh tunnel port, on the overlay address too
	// EncryptAll carries all cross-node pod traffic (see routes.go).
	EncryptAll bool
	// NetnsPath is the node's network namespace, where the UDP socket
	// opens and encrypt-all programs its routes (default: the namespace
	// of the thread that calls New, held open from then on, so that a
	// thread-group leader later locked into a pod's namespace, which
	// /proc/self/ns/net names, is never taken for the node's).
	NetnsPath string
	// RouteTable and RulePriority are used by encrypt-all (defaults
	// DefaultRouteTable, DefaultRulePriority).
	RouteTable, RulePriority int
	// PodNetworks are the cluster's pod (and service) CIDRs: a peer whose
	// spec.podCIDRs are not inside is refused (peers.go). Unchecked when
	// empty.
	PodNetworks []netip.Prefix
	// Required (strict mode, once every node runs transport wireguard):
	// nodes that publish no key are refused and, with EncryptAll, their
	// pod CIDRs blackholed, instead of being reached on the underlay.
	Required bool
}

func (c *Config) defaults() error {
	if c.NodeName == "" || !c.NodeIP.IsValid() || c.StateDir == "" || c.MeshPort == 0 {
		return errors.New("wireguard config: node name, node IP, state dir and mesh port are required")
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Port < 1 || c.Port > 65535 {
		return fmt.Errorf("wireguard config: port %d", c.Port)
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.UnderlayMTU == 0 {
		c.UnderlayMTU = 1500
	}
	if c.HostMTU == 0 {
		c.HostMTU = c.UnderlayMTU - 80
	}
	if c.MTU < 1280 || c.MTU > 65000 || c.HostMTU < 1280 || c.HostMTU > 65000 {
		return fmt.Errorf("wireguard config: mtu %d, host mtu %d: want 1280 to 65000", c.MTU, c.HostMTU)
	}
	if c.RouteTable == 0 {
		c.RouteTable = DefaultRouteTable
	}
	if c.RulePriority == 0 {
		c.RulePriority = DefaultRulePriority
	}
	return nil
}

// Transport is the node's WireGuard transport. New builds it (reading or
// creating the key; nothing runs); Run brings the device up, publishes the
// node's annotations, follows the peers and serves until ctx ends.
//
// State: new -> running (Run) -> closed (Run returned). Dials before the
// node informer has synced wait for it (Synced is part of the agent's
// gate, so the agent claims no flow before).
type Transport struct {
	cfg     Config
	client  kubernetes.Interface
	log     *slog.Logger
	priv    Key
	tun     *TUN
	peers   *Peers
	metrics *metrics
	dev     *device.Device // made in New, brought up by Run
	routes  *routes        // nil unless EncryptAll

	synced    atomic.Bool
	published atomic.Bool

	hostMu    sync.Mutex    // guards hostFD
	hostFD    int           // the agent's host TUN (encrypt-all), -1 until AttachHost
	hostReady chan struct{} // closed by the first AttachHost
	hostOnce  sync.Once

	// republish asks Run to publish the annotations again (someone
	// changed them on the Node).
	republish chan struct{}
}

// New reads (or creates) the node's key and builds the device, its TUN and
// the peer table.
func New(cfg Config, client kubernetes.Interface, reg prometheus.Registerer, log *slog.Logger) (*Transport, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if client == nil || reg == nil || log == nil {
		return nil, errors.New("wireguard: nil dependency")
	}
	overlay, err := OverlayAddr(cfg.NodeIP)
	if err != nil {
		return nil, fmt.Errorf("wireguard: %w", err)
	}
	priv, created, err := LoadOrCreateKey(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if cfg.NetnsPath == "" {
		if cfg.NetnsPath, err = holdNodeNetns(); err != nil {
			return nil, err
		}
	}
	tn, err := NewTUN(overlay, cfg.MTU)
	if err != nil {
		return nil, err
	}
	t := &Transport{cfg: cfg, client: client, log: log, priv: priv, tun: tn, hostFD: -1,
		hostReady: make(chan struct{}), republish: make(chan struct{}, 1)}
	if cfg.EncryptAll {
		t.routes = newRoutes(cfg.RouteTable, cfg.RulePriority, cfg.NetnsPath, log)
	}
	if t.metrics, err = newMetrics(reg, t); err != nil {
		tn.Close()
		return nil, fmt.Errorf("wireguard metrics: %w", err)
	}
	bind := &nsBind{Bind: conn.NewStdNetBind(), nsPath: cfg.NetnsPath, maxDatagram: cfg.UnderlayMTU - 48, // IPv6 + UDP headers: the stricter family
		garbage: func() { t.metrics.dropped.WithLabelValues("malformed").Inc() }}
	t.dev = device.NewDevice(tn, bind, t.deviceLogger())
	var onChange func([]netip.Prefix, []Peer, []Peer)
	if t.routes != nil {
		onChange = t.routes.sync
	}
	t.peers = NewPeers(cfg.NodeName, cfg.EncryptAll, t.dev, onChange, log)
	t.peers.podNetworks = slices.Clone(cfg.PodNetworks)
	t.peers.required = cfg.Required
	log.Info("wireguard key", "public_key", priv.PublicKey().String(), "created", created, "overlay", overlay.String())
	return t, nil
}

// deviceLogger sends wireguard-go's log to slog at debug level, and counts
// the handshake messages it drops as invalid (wireguard-go has no
// counters; these format strings are those of the pinned version).
func (t *Transport) deviceLogger() *device.Logger {
	l := t.log.With("component", "wireguard-go")
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			switch {
			case strings.HasPrefix(format, "Received invalid initiation message"),
				strings.HasPrefix(format, "Received invalid response message"),
				strings.HasPrefix(format, "Received packet with invalid mac1"),
				strings.HasPrefix(format, "Could not decrypt invalid cookie response"),
				strings.HasPrefix(format, "Failed to decode cookie reply"):
				t.metrics.dropped.WithLabelValues("invalid_handshake").Inc()
			}
			if l.Enabled(context.Background(), slog.LevelDebug) {
				l.Debug(fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			l.Warn(fmt.Sprintf(format, args...))
		},
	}
}

// PublicKey is the node's public key.
func (t *Transport) PublicKey() Key { return t.priv.PublicKey() }

// Overlay is the node's overlay address.
func (t *Transport) Overlay() netip.Addr { return t.tun.Overlay() }

// Synced reports whether the node informer has synced.
func (t *Transport) Synced() bool { return t.synced.Load() }

// Ready fails until the device is up and the node's annotations are
// published.
func (t *Transport) Ready() error {
	if !t.published.Load() {
		return errors.New("wireguard: annotations not published yet")
	}
	if !t.synced.Load() {
		return errors.New("wireguard: node informer not synced")
	}
	if t.routes != nil && !slices.ContainsFunc(t.peers.LocalPodCIDRs(), func(c netip.Prefix) bool { return c.Addr().Is4() }) {
		// Encrypt-all routes from this node's IPv4 pod CIDR: without one
		// nothing of its pods' traffic would be encrypted.
		return errors.New("wireguard: encrypt-all: this node's Node has no IPv4 pod CIDR (spec.podCIDRs)")
	}
	return nil
}

// Published is what this node publishes.
func (t *Transport) Published() Published {
	return Published{PublicKey: t.PublicKey(), Endpoint: netip.AddrPortFrom(t.cfg.NodeIP.Unmap(), uint16(t.cfg.Port)), Overlay: t.Overlay(), EncryptAll: t.cfg.EncryptAll}
}

// ErrRefusedPeer is returned by DialTCP for a node that claims WireGuard
// with annotations this node cannot use: it is never dialled in clear.
var ErrRefusedPeer = errors.New("wireguard: peer's annotations are not usable; not dialling it on the underlay")

// DialTCP dials the mesh tunnel port of the node at nodeIP: over WireGuard
// to its overlay address if it publishes a key, else from localAddr (if
// valid) on the underlay. It is the dialer's DialTCP hook.
func (t *Transport) DialTCP(localAddr netip.Addr) func(ctx context.Context, node netip.Addr, port int) (net.Conn, error) {
	return func(ctx context.Context, node netip.Addr, port int) (net.Conn, error) {
		route, overlay := t.peers.Route(node)
		switch route {
		case RouteOverlay:
			t.metrics.dials.WithLabelValues("overlay").Inc()
			return dialOverlay(ctx, t.tun.Stack(), netip.AddrPortFrom(overlay, uint16(port)))
		case RouteRefused:
			t.metrics.refused.WithLabelValues("refused_peer").Inc()
			return nil, fmt.Errorf("dial mesh peer %s: %w", node, ErrRefusedPeer)
		}
		t.metrics.dials.WithLabelValues("underlay").Inc()
		var nd net.Dialer
		if localAddr.IsValid() {
			nd.LocalAddr = &net.TCPAddr{IP: localAddr.AsSlice()}
		}
		return nd.DialContext(ctx, "tcp", net.JoinHostPort(node.String(), strconv.Itoa(port)))
	}
}

// RouteOf names the path DialTCP takes to the node at nodeIP now (the
// dialer's RouteOf hook: pooled connections made on another path are
// drained).
func (t *Transport) RouteOf(nodeIP netip.Addr) string {
	route, overlay := t.peers.Route(nodeIP)
	if overlay.IsValid() {
		return route.String() + " " + overlay.String()
	}
	return route.String()
}

// UnderlayListener wraps the mesh listener on the node address: tunnels
// from nodes that publish a key are refused there (counted).
func (t *Transport) UnderlayListener(ln net.Listener) net.Listener {
	return &underlayListener{Listener: ln, route: t.peers.Route,
		refused: func() { t.metrics.refused.WithLabelValues("underlay_from_wireguard_node").Inc() }}
}

// ListenOverlay listens for mesh tunnels on the overlay address; each
// connection's RemoteAddr is its peer's node address.
func (t *Transport) ListenOverlay() (net.Listener, error) {
	ln, err := listenOverlay(t.tun.Stack(), t.Overlay(), t.cfg.MeshPort)
	if err != nil {
		return nil, err
	}
	return &overlayListener{Listener: ln, nodeOf: t.peers.NodeOfOverlay,
		refused: func() { t.metrics.refused.WithLabelValues("unknown_overlay_peer").Inc() }}, nil
}

// Run brings the device up, publishes the annotations, follows the nodes,
// and, with EncryptAll, carries pod traffic through the host TUN (see
// AttachHost). It closes the device when ctx ends.
func (t *Transport) Run(ctx context.Context) error {
	defer t.dev.Close()
	if err := t.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\n", t.priv.Hex(), t.cfg.Port)); err != nil {
		return fmt.Errorf("configure wireguard device: %w", err)
	}
	if err := t.dev.Up(); err != nil {
		return fmt.Errorf("wireguard device up: %w", err)
	}
	if t.routes != nil {
		defer t.routes.close()
	}
	factory := informers.NewSharedInformerFactoryWithOptions(t.client, 0)
	inf := factory.Core().V1().Nodes().Informer()
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { t.onNode(obj) },
		UpdateFunc: func(_, obj any) { t.onNode(obj) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if n, ok := obj.(*corev1.Node); ok {
				t.peers.Delete(n.Name)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("node informer: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	// The registration's HasSynced, not the informer's: it is true only
	// once our handlers have seen every node of the initial list, so the
	// peer table (and the routes pruned after markSynced) is complete.
	if !cache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
		return nil // ctx ended
	}
	t.synced.Store(true)
	if t.routes != nil {
		// The handlers have seen every node: the routes may now delete
		// what the view lacks (never before: routes.go).
		t.routes.markSynced()
	}
	t.log.Info("wireguard transport running", "port", t.cfg.Port, "overlay", t.Overlay().String(), "encrypt_all", t.cfg.EncryptAll, "mtu", t.cfg.MTU)

	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() { // RoutinePublish: ends once published or with ctx
		defer wg.Done()
		t.publish(ctx)
	}()
	if t.routes != nil {
		wg.Add(1)
		go func() { // RoutineHostReader: ends with ctx
			defer wg.Done()
			t.readHost(ctx)
		}()
	}
	// Peers whose configuration the device refused are retried with
	// backoff (peers.go: they are refused, not reached in clear, until).
	const minRetry, maxRetry = 500 * time.Millisecond, 30 * time.Second
	retryIn := minRetry
	retry := time.NewTimer(retryIn)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.republish:
			t.publish(ctx)
		case <-retry.C:
			if t.peers.Retry() > 0 {
				retryIn = min(2*retryIn, maxRetry)
			} else {
				retryIn = minRetry
			}
			retry.Reset(retryIn)
		}
	}
}

func (t *Transport) onNode(obj any) {
	if n, ok := obj.(*corev1.Node); ok {
		t.peers.Update(n)
		if n.Name == t.cfg.NodeName && t.published.Load() {
			// Someone changed or removed our annotations: put them back.
			if p, err := ParsePublished(n.Annotations); err != nil || p != t.Published() {
				t.published.Store(false)
				select {
				case t.republish <- struct{}{}:
				default: // already asked
				}
			}
		}
	}
}

// publish patches the node's annotations, retrying with backoff until it
// succeeds or ctx ends.
func (t *Transport) publish(ctx context.Context) {
	patch, err := t.Published().MergePatch()
	if err != nil {
		t.log.Error("wireguard annotations", "err", err)
		return
	}
	backoff := 200 * time.Millisecond
	for {
		_, err := t.client.CoreV1().Nodes().Patch(ctx, t.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{})
		if err == nil {
			t.published.Store(true)
			t.log.Info("wireguard annotations published", "node", t.cfg.NodeName, "public_key", t.PublicKey().String(), "endpoint", t.Published().Endpoint.String())
			return
		}
		t.log.Warn("publish wireguard annotations", "node", t.cfg.NodeName, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// holdNodeNetns opens the calling thread's network namespace (the node's:
// New runs before the agent enters any pod's) and returns a path that
// names it for the process's lifetime (/proc/self/fd/N; the fd is never
// closed: the transport uses it until the process exits).
func holdNodeNetns() (string, error) {
	goruntime.LockOSThread()
	defer goruntime.UnlockOSThread()
	ns, err := netns.GetFromPath(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		return "", fmt.Errorf("wireguard: open the node's network namespace: %w", err)
	}
	return fmt.Sprintf("/proc/self/fd/%d", int(ns)), nil
}
