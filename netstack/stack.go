package netstack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/tunmesh/tunmesh/netstack/rawio"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

// NICID identifies a pod NIC within a Stack. IDs are not reused while the
// Stack lives.
type NICID int32

// Flow is a TCP flow that entered the stack from a pod NIC (or, for DialTCP,
// that the stack opened into one).
type Flow struct {
	// NIC is the pod NIC the SYN arrived on. It, not Src, is the pod's
	// identity: the NIC drops packets whose source is not the pod's.
	NIC NICID
	// Src is the pod's end of the flow.
	Src netip.AddrPort
	// Dst is the original destination the pod connected to.
	Dst netip.AddrPort
	// SYNACK is set only for SegmentDecider: the segment is a SYN-ACK, so
	// the pod is the server of a connection its peer opened around the
	// stack (a plaintext client reaching the pod's eth0).
	SYNACK bool
}

func (f Flow) String() string {
	return fmt.Sprintf("nic %d %s -> %s", f.NIC, f.Src, f.Dst)
}

// Decision is a FlowHandler's verdict on a new flow.
type Decision int

const (
	// Passthrough sends the flow's packets to the host network stack
	// unchanged, as if the mesh were not there. It is the zero value.
	Passthrough Decision = iota
	// Terminate completes the handshake in the stack and hands the
	// connection to FlowHandler.ServeConn.
	Terminate
	// Drop discards the packet without an answer: the pod's kernel
	// retransmits a SYN later and asks again (a hold). Values this
	// package does not know mean Drop too: the stack fails closed.
	Drop
	// Reset answers the SYN with a RST: the pod's connect fails at once
	// (a refusal).
	Reset
)

func (d Decision) String() string {
	switch d {
	case Passthrough:
		return "passthrough"
	case Terminate:
		return "terminate"
	case Reset:
		return "reset"
	}
	return "drop"
}

// FlowHandler decides what happens to new TCP flows from pods and serves the
// ones it terminates.
type FlowHandler interface {
	// HandleFlow is called once per new flow, on its own goroutine, when
	// the flow's first SYN arrives. The pod waits (and retransmits its SYN
	// after a second) until it returns, so it should be quick; at most
	// Options.MaxInFlight flows are decided or handshaking at once.
	HandleFlow(f Flow) Decision
	// ServeConn is called, on the same goroutine, for every flow
	// HandleFlow terminated, once the handshake with the pod completed.
	// conn is a *Conn (it has CloseWrite, CloseRead and SetLinger);
	// ServeConn owns it and must close it. ctx is cancelled when the Stack
	// closes, and Stack.Close also aborts conn and then waits for
	// ServeConn to return, and for the release of every Conn.Hold (which
	// lets ServeConn return while callbacks serve the connection).
	ServeConn(ctx context.Context, conn net.Conn, f Flow)
}

// SegmentDecider is optionally implemented by a FlowHandler. When it is,
// a TCP segment from a pod that is neither a SYN nor part of a flow the
// stack owns or remembers (for example a retransmission of a connection
// the stack terminated before the agent restarted) is not passed through
// blindly: HandleSegment decides. Passthrough forwards the segment and
// remembers the flow (later segments go straight through); any other
// value drops it (counted in NICStats.FailClosedDrops). It is called on
// the NIC's reader goroutine, so it must be quick and must not block.
// Without a SegmentDecider such segments pass through.
type SegmentDecider interface {
	HandleSegment(f Flow) Decision
}

// PacketWriter takes raw IP packets that the stack passes through to the
// host. WritePacket is called concurrently (from every pod NIC's reader) and
// must not keep b after it returns.
type PacketWriter interface {
	WritePacket(b []byte) error
}

// OffloadWriter is optionally implemented by a PacketWriter that can take
// packets with offload state: a partial TCP/UDP checksum or a TCP
// super-packet, described by h as on a tun.ModeOffload TUN. The stack then
// passes a pod's offloaded packets on as they came instead of finishing
// checksums and cutting super-packets itself. Same rules as WritePacket.
type OffloadWriter interface {
	PacketWriter
	WriteOffload(b []byte, h tun.VnetHdr) error
}

// FDWriter returns a PacketWriter that writes each packet to fd, a
// host-side TUN device made with tun.CreateInNetns in the node's namespace
// (with rp_filter off on it and forwarding on in that namespace). For a fd
// in tun.ModeOffload it writes the virtio header too and is an
// OffloadWriter. The writes are raw system calls (package rawio), which
// keep the calling goroutine's P: fd must be one whose writes never wait.
// A TUN's do not, even in blocking mode: its send buffer is unlimited
// unless TUNSETSNDBUF lowers it (tunmesh never does), and a full queue
// drops. The caller keeps ownership of fd and closes it after the Stack.
func FDWriter(fd int) PacketWriter {
	if mode, err := tun.FDMode(fd); err == nil && mode == tun.ModeOffload {
		return vnetFDWriter(fd)
	}
	return fdWriter(fd)
}

type fdWriter int

func (w fdWriter) WritePacket(b []byte) error {
	_, err := rawio.Write(uintptr(w), b)
	return err
}

type vnetFDWriter int

// plainVnetHdr is the header of a packet with nothing offloaded.
var plainVnetHdr [tun.VnetHdrLen]byte

func (w vnetFDWriter) WritePacket(b []byte) error {
	var iov [2]unix.Iovec
	_, _, err := rawio.Writev(uintptr(w), [][]byte{plainVnetHdr[:], b}, iov[:0])
	return err
}

func (w vnetFDWriter) WriteOffload(b []byte, h tun.VnetHdr) error {
	var hdr [tun.VnetHdrLen]byte
	h.Encode(hdr[:])
	var iov [2]unix.Iovec
	_, _, err := rawio.Writev(uintptr(w), [][]byte{hdr[:], b}, iov[:0])
	return err
}

// Options configure a Stack. Zero values mean the documented defaults.
type Options struct {
	// Handler decides on and serves new flows. Required.
	Handler FlowHandler
	// Passthrough receives every packet from a pod that the stack does
	// not own. nil drops those packets (counted in NICStats.OtherDrops),
	// which breaks non-mesh traffic: only tests should leave it nil.
	Passthrough PacketWriter
	// UnderlayMTU, when non-zero, clamps the MSS option of passthrough
	// SYN and SYN-ACK segments to UnderlayMTU-40 (IPv4) or
	// UnderlayMTU-60 (IPv6), so pods with a large tm0 MTU do not
	// advertise segments the underlay cannot carry.
	UnderlayMTU int
	// FlowIdleTimeout is how long a passthrough flow is remembered after
	// its last packet. Default 5 minutes. Forgetting one is harmless for
	// its later packets (they are not owned, so they pass through anyway);
	// only a late SYN retransmission would be decided again.
	FlowIdleTimeout time.Duration
	// MaxInFlight bounds flows being decided or handshaking; further SYNs
	// are dropped until the pod retransmits. Default 1024.
	MaxInFlight int
	// ReceiveWindow is the initial receive window of terminated flows in
	// bytes. Default 1 MiB (gVisor's default).
	ReceiveWindow int
	// TimeWait is how long the stack keeps a connection it closed first
	// in TIME_WAIT. Default 1s, not TCP's 60s: see defaultTimeWait.
	TimeWait time.Duration
	// OnPassthroughSYNACK, if set, is told of every SYN-ACK a pod sends
	// through to the host (connection accounting of plaintext inbound
	// connections; see observe.go). nil: nothing is reported.
	OnPassthroughSYNACK PassthroughSYN
	// Go, if set, runs the work of each new SYN (the decision, the
	// handshake and ServeConn): gVisor's forwarder starts a goroutine per
	// SYN, which hands the work to Go at once and exits, so the work runs
	// on a goroutine whose stack has grown already (a worker pool). nil:
	// the work runs on the forwarder's goroutine.
	Go func(func())
}

// Errors returned by Stack methods.
var (
	ErrClosed     = errors.New("netstack: stack closed")
	ErrUnknownNIC = errors.New("netstack: unknown nic")
)

const (
	// defaultTimeWait is short on purpose. Every connection the stack
	// closes first (the far side of the tunnel ended first) stays in
	// TIME_WAIT, holding an endpoint: at TCP's 60 s, churn of a few
	// hundred connections a second keeps tens of thousands of them. On a
	// TUN between a pod and its node's agent there is no network to delay
	// or duplicate segments, so one second keeps the guard for the final
	// ACK. A pod that reuses a tuple sooner is served anyway: its SYN
	// frees the TIME_WAIT (nic.reuseTimeWait).
	defaultTimeWait        = time.Second
	defaultFlowIdleTimeout = 5 * time.Minute
	defaultMaxInFlight     = 1024
	// pendingSYNTTL bounds how long a SYN copy waits for a decision.
	pendingSYNTTL = 30 * time.Second
	// bufSize is the TCP send/receive buffer range maximum.
	bufSize = 8 << 20
)

// Stack is the node's userspace network stack. Its methods are safe for
// concurrent use.
//
// Lifecycle: New -> open -> closed. New starts the flow-expiry goroutine;
// AttachTUN starts one gVisor reader goroutine per NIC; DetachNIC and Close
// stop them. Close is idempotent.
type Stack struct {
	logger *slog.Logger
	opts   Options
	stack  *stack.Stack
	epoch  time.Time // origin of the monotonic clock used by flow tables

	ctx    context.Context // cancelled by Close; handed to ServeConn
	cancel context.CancelFunc

	closeOnce   sync.Once
	janitorStop chan struct{}
	janitorDone chan struct{}
	// active counts running HandleFlow/ServeConn calls and API calls
	// (AttachTUN, DetachNIC, DialTCP). Add only under mu while !closed.
	active sync.WaitGroup

	mu     sync.RWMutex
	closed bool
	nextID NICID
	nics   map[NICID]*nic
	byAddr map[netip.Addr]*nic // pod address -> its NIC; addresses are unique
}

// New creates a Stack. It starts the flow-expiry goroutine; Close stops it.
func New(opts Options, logger *slog.Logger) (*Stack, error) {
	if opts.Handler == nil {
		return nil, errors.New("new netstack: nil Handler")
	}
	if logger == nil {
		return nil, errors.New("new netstack: nil logger")
	}
	if opts.UnderlayMTU < 0 || opts.FlowIdleTimeout < 0 || opts.MaxInFlight < 0 || opts.ReceiveWindow < 0 || opts.TimeWait < 0 {
		return nil, errors.New("new netstack: negative option")
	}
	if opts.FlowIdleTimeout == 0 {
		opts.FlowIdleTimeout = defaultFlowIdleTimeout
	}
	if opts.MaxInFlight == 0 {
		opts.MaxInFlight = defaultMaxInFlight
	}
	if opts.TimeWait == 0 {
		opts.TimeWait = defaultTimeWait
	}
	timeWait := tcpip.TCPTimeWaitTimeoutOption(opts.TimeWait)

	gs := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	for _, opt := range []tcpip.SettableTransportProtocolOption{
		new(tcpip.TCPSACKEnabled(true)),
		new(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: tcp.DefaultReceiveBufferSize, Max: bufSize},
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: tcp.DefaultSendBufferSize, Max: bufSize},
		&timeWait,
	} {
		if tcpipErr := gs.SetTransportProtocolOption(tcp.ProtocolNumber, opt); tcpipErr != nil {
			gs.Destroy()
			return nil, fmt.Errorf("new netstack: set tcp option %T: %v", opt, tcpipErr)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	s := &Stack{
		logger:      logger.With("component", "netstack"),
		opts:        opts,
		stack:       gs,
		epoch:       time.Now(),
		ctx:         ctx,
		cancel:      cancel,
		janitorStop: make(chan struct{}),
		janitorDone: make(chan struct{}),
		nextID:      1,
		nics:        make(map[NICID]*nic),
		byAddr:      make(map[netip.Addr]*nic),
	}
	// The forwarder must be installed before any NIC exists (a NIC's
	// reader may deliver a SYN as soon as the NIC is enabled).
	handle := s.forward
	if opts.Go != nil {
		handle = func(r *tcp.ForwarderRequest) { opts.Go(func() { s.forward(r) }) }
	}
	fwd := tcp.NewForwarder(gs, opts.ReceiveWindow, opts.MaxInFlight, handle)
	gs.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)

	go s.routineExpireFlows()
	return s, nil
}

// now is the Stack's monotonic clock in nanoseconds.
func (s *Stack) now() int64 { return int64(time.Since(s.epoch)) }

// enter registers a running call that Close must wait for. It fails once
// the Stack is closed.
func (s *Stack) enter() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return false
	}
	s.active.Add(1)
	return true
}

func (s *Stack) exit() { s.active.Done() }

// Close stops the Stack: it stops reading every NIC and closes their TUN
// fds, aborts every connection (ServeConn's, DialTCP's), cancels the context
// given to ServeConn, and waits for HandleFlow/ServeConn calls and all
// goroutines the Stack or gVisor started. The order matters: inputs first
// (so no new flows start), then connections (so handlers blocked on them
// return), then the wait. It always returns nil; calling it again is a no-op.
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		nics := make([]*nic, 0, len(s.nics))
		for _, n := range s.nics {
			nics = append(nics, n)
		}
		clear(s.nics)
		clear(s.byAddr)
		s.mu.Unlock()

		s.cancel()
		close(s.janitorStop)
		<-s.janitorDone
		for _, n := range nics {
			s.removeNIC(n, true)
		}
		s.stack.Close() // aborts every registered endpoint
		s.active.Wait()
		s.stack.Wait()
	})
	return nil
}

// NICConfig describes a pod TUN device to attach.
type NICConfig struct {
	// FD is an fd of an IFF_TUN|IFF_NO_PI device (tun.CreateInNetns or
	// tun.OpenInNetns), in either tun.Mode: with IFF_VNET_HDR the NIC uses
	// the offloads, without it one packet per read and write. On success the Stack owns it and closes it in
	// DetachNIC or Close; on error the caller still owns it.
	FD int
	// Addrs are the pod's own addresses. Packets from any other source
	// are dropped; routes to these addresses point at this NIC. No two
	// NICs may share an address.
	Addrs []netip.Addr
	// MTU is the TUN device's MTU.
	MTU int
	// Name labels the NIC in logs and stats (e.g. "namespace/pod").
	Name string
}

// AttachTUN adds a NIC for a pod's TUN device and starts reading it.
func (s *Stack) AttachTUN(cfg NICConfig) (NICID, error) {
	addrs, err := checkNICConfig(cfg)
	if err != nil {
		return 0, fmt.Errorf("attach tun %q: %w", cfg.Name, err)
	}
	// Counted in active so that Close waits for a NIC being created
	// rather than racing with it.
	if !s.enter() {
		return 0, ErrClosed
	}
	defer s.exit()

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, ErrClosed
	}
	for _, a := range addrs {
		if other, ok := s.byAddr[a]; ok {
			s.mu.Unlock()
			return 0, fmt.Errorf("attach tun %q: address %s already belongs to nic %d (%q)", cfg.Name, a, other.id, other.name)
		}
	}
	id := s.nextID
	s.nextID++
	n := &nic{
		id:    id,
		name:  cfg.Name,
		fd:    cfg.FD,
		addrs: addrs,
		s:     s,
		flows: newFlowTable(),
	}
	// Reserve the addresses now so a concurrent AttachTUN cannot claim
	// them; the NIC becomes visible in s.nics only once it works.
	for _, a := range addrs {
		s.byAddr[a] = n
	}
	s.mu.Unlock()

	if err := s.createNIC(n, cfg.MTU); err != nil {
		s.mu.Lock()
		for _, a := range addrs {
			delete(s.byAddr, a)
		}
		s.mu.Unlock()
		return 0, fmt.Errorf("attach tun %q: %w", cfg.Name, err)
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		// Close ran meanwhile and did not see this NIC: undo it here,
		// leaving the fd to the caller as documented.
		s.removeNIC(n, false)
		return 0, ErrClosed
	}
	s.nics[id] = n
	s.mu.Unlock()
	s.logger.Info("nic attached", "nic", id, "name", cfg.Name, "addrs", addrs, "mtu", cfg.MTU)
	return id, nil
}

func checkNICConfig(cfg NICConfig) ([]netip.Addr, error) {
	if cfg.FD < 0 {
		return nil, fmt.Errorf("bad fd %d", cfg.FD)
	}
	if len(cfg.Addrs) == 0 {
		return nil, errors.New("no pod addresses")
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("mtu %d outside [576, 65535]", cfg.MTU)
	}
	_, flags, err := tun.Info(cfg.FD)
	if err != nil {
		return nil, err
	}
	if flags&(unix.IFF_TUN|unix.IFF_TAP) != unix.IFF_TUN || flags&unix.IFF_NO_PI == 0 {
		return nil, fmt.Errorf("fd %d: tun flags %#x, want IFF_TUN|IFF_NO_PI", cfg.FD, flags)
	}
	addrs := make([]netip.Addr, 0, len(cfg.Addrs))
	for _, a := range cfg.Addrs {
		a = a.Unmap()
		if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.IsLinkLocalUnicast() {
			return nil, fmt.Errorf("bad pod address %s", a)
		}
		if a.Is6() && cfg.MTU < tun.MinMTU {
			return nil, fmt.Errorf("mtu %d below the IPv6 minimum %d", cfg.MTU, tun.MinMTU)
		}
		if slices.Contains(addrs, a) {
			return nil, fmt.Errorf("duplicate pod address %s", a)
		}
		addrs = append(addrs, a)
	}
	return addrs, nil
}

// createNIC builds n's gVisor NIC: created disabled, configured
// (promiscuous, spoofing, routes), then enabled, which starts the reader.
func (s *Stack) createNIC(n *nic, mtu int) error {
	child, err := newTUNEndpoint(n.fd, uint32(mtu), n.readerStopped)
	if err != nil {
		return fmt.Errorf("tun endpoint: %w", err)
	}
	n.child = child
	n.link = newLinkEndpoint(child, n)

	nicID := tcpip.NICID(n.id)
	success := false
	defer func() {
		if !success {
			s.stopReader(n)
			s.stack.RemoveNIC(nicID)
			child.Close() // RemoveNIC closes it only if the NIC was created
		}
	}()
	if tcpipErr := s.stack.CreateNICWithOptions(nicID, n.link, stack.NICOptions{Disabled: true}); tcpipErr != nil {
		return fmt.Errorf("create nic %d: %v", n.id, tcpipErr)
	}
	if tcpipErr := s.stack.SetPromiscuousMode(nicID, true); tcpipErr != nil {
		return fmt.Errorf("nic %d promiscuous: %v", n.id, tcpipErr)
	}
	if tcpipErr := s.stack.SetSpoofing(nicID, true); tcpipErr != nil {
		return fmt.Errorf("nic %d spoofing: %v", n.id, tcpipErr)
	}
	for _, a := range n.addrs {
		s.stack.AddRoute(tcpip.Route{Destination: hostSubnet(a), NIC: nicID})
	}
	if tcpipErr := s.stack.EnableNIC(nicID); tcpipErr != nil {
		return fmt.Errorf("enable nic %d: %v", n.id, tcpipErr)
	}
	success = true
	return nil
}

// DetachNIC stops reading the NIC, closes its TUN fd (the persistent device
// stays) and aborts every connection the stack holds with the pod.
func (s *Stack) DetachNIC(id NICID) error {
	if !s.enter() {
		return ErrClosed
	}
	defer s.exit()
	s.mu.Lock()
	n, ok := s.nics[id]
	if ok {
		delete(s.nics, id)
		for _, a := range n.addrs {
			delete(s.byAddr, a)
		}
	}
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("detach nic %d: %w", id, ErrUnknownNIC)
	}
	s.removeNIC(n, true)
	aborted := s.abortEndpoints(n.addrs)
	s.logger.Info("nic detached", "nic", id, "name", n.name, "aborted_conns", aborted)
	return nil
}

// removeNIC removes n from gVisor (which stops and waits for its reader),
// closes the endpoint's own fd and, if closeFD, the TUN fd.
func (s *Stack) removeNIC(n *nic, closeFD bool) {
	n.removing.Store(true)
	s.stopReader(n)
	if tcpipErr := s.stack.RemoveNIC(tcpip.NICID(n.id)); tcpipErr != nil {
		s.logger.Warn("remove nic", "nic", n.id, "err", tcpipErr)
	}
	n.child.Close() // RemoveNIC did, unless gVisor had no such NIC
	if !closeFD {
		return
	}
	// Leave the persistent device as an agent without offloads expects
	// it (a rollback): the next agent of this version turns them on again.
	if n.child.offload {
		// EBADFD: the device is gone with the pod's namespace.
		if err := tun.ClearOffloads(n.fd); err != nil && !errors.Is(err, unix.EBADFD) {
			s.logger.Warn("tun offloads left on", "nic", n.id, "err", err)
		}
	}
	if err := unix.Close(n.fd); err != nil {
		s.logger.Warn("close tun fd", "nic", n.id, "err", err)
	}
}

// stopReader stops n's TUN reader and waits for it, before the NIC is
// removed from gVisor. stack.RemoveNIC would do the same, but it does so
// while holding gVisor's stack lock, and a packet in flight on the reader
// takes that lock for reading (ipv4's HandlePacket looks up the NIC name
// for iptables): RemoveNIC then waits for the reader forever. Detaching
// here, without the lock, lets that packet finish (it is dropped: the
// wrapper has no dispatcher any more); RemoveNIC's own detach is then a
// no-op.
func (s *Stack) stopReader(n *nic) {
	n.link.Attach(nil)
}

// abortEndpoints resets every TCP endpoint whose remote end is one of addrs:
// terminated flows from the pod and flows dialed into it.
func (s *Stack) abortEndpoints(addrs []netip.Addr) int {
	var n int
	for _, ep := range s.stack.RegisteredEndpoints() {
		tep, ok := ep.(interface{ Info() tcpip.EndpointInfo })
		if !ok {
			continue
		}
		info, ok := tep.Info().(*stack.TransportEndpointInfo)
		if !ok {
			continue
		}
		if slices.Contains(addrs, fromTCPIPAddr(info.ID.RemoteAddress)) {
			ep.Abort()
			n++
		}
	}
	return n
}

// DialTCP opens a TCP connection into the pod behind nic, from src (any
// address, typically the remote client's pod IP: the pod sees it as the
// peer) to dst, which must be one of the pod's addresses. src's port 0 picks
// an ephemeral port. The caller owns the returned conn (a *Conn).
//
// The 4-tuple is registered in gVisor's demuxer before the SYN leaves, so
// the pod's SYN-ACK is recognised as stack-owned and delivered to the stack
// rather than passed through.
func (s *Stack) DialTCP(ctx context.Context, id NICID, src, dst netip.AddrPort) (net.Conn, error) {
	if !s.enter() {
		return nil, ErrClosed
	}
	defer s.exit()
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	s.mu.RLock()
	n, ok := s.nics[id]
	s.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("dial %s -> %s: nic %d: %w", src, dst, id, ErrUnknownNIC)
	}
	if !src.Addr().IsValid() || !dst.IsValid() || src.Addr().Is4() != dst.Addr().Is4() {
		return nil, fmt.Errorf("dial %s -> %s: need a valid source and destination of one family", src, dst)
	}
	if !n.ownsAddr(dst.Addr()) {
		return nil, fmt.Errorf("dial %s -> %s: %s is not an address of nic %d (%q)", src, dst, dst.Addr(), id, n.name)
	}
	netProto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		netProto = ipv6.ProtocolNumber
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()

	nicID := tcpip.NICID(id)
	conn, err := dialTCP(ctx, s.stack,
		tcpip.FullAddress{NIC: nicID, Addr: toTCPIPAddr(src.Addr()), Port: src.Port()},
		tcpip.FullAddress{NIC: nicID, Addr: toTCPIPAddr(dst.Addr()), Port: dst.Port()},
		netProto)
	if err != nil {
		return nil, fmt.Errorf("dial %s -> %s on nic %d: %w", src, dst, id, err)
	}
	n.counters.dialedFlows.Add(1)
	return conn, nil
}

// NICStats are one NIC's counters since it was attached.
type NICStats struct {
	ID   NICID
	Name string
	// SpoofedDrops counts packets whose source was not a pod address.
	SpoofedDrops uint64
	// OtherDrops counts packets dropped for other reasons: malformed,
	// link-local or unspecified source, or no Passthrough writer.
	OtherDrops uint64
	// PassthroughPackets and PassthroughBytes count packets written to
	// the host; PassthroughErrors counts failed writes.
	PassthroughPackets uint64
	PassthroughBytes   uint64
	PassthroughErrors  uint64
	// MSSClamped counts passthrough SYN/SYN-ACKs whose MSS was lowered.
	MSSClamped uint64
	// PassthroughFlows counts flows HandleFlow passed through.
	PassthroughFlows uint64
	// TerminatedFlows counts terminated flows whose handshake completed;
	// HandshakeFailures those whose handshake did not.
	TerminatedFlows   uint64
	HandshakeFailures uint64
	// DialedFlows counts successful DialTCP calls into the NIC.
	DialedFlows uint64
	// RefusedFlows counts new flows the handler decided Drop or Reset;
	// FailClosedDrops counts stray segments SegmentDecider refused.
	RefusedFlows    uint64
	FailClosedDrops uint64
	// FlowTableFull counts passthrough flows not remembered because the
	// NIC's flow table was at its cap.
	FlowTableFull uint64
	// TimeWaitReused counts new flows from the pod on a tuple the stack
	// still held in TIME_WAIT (freed for the new flow).
	TimeWaitReused uint64
	// SuperPackets counts TCP super-packets (TSO) read from the pod, each
	// counted once however many segments it stands for.
	SuperPackets uint64
	// DatagramDecisions counts non-TCP flows the DatagramDecider judged,
	// DatagramDenied the non-TCP packets dropped as denied, and
	// DatagramTableFull decisions not remembered (table at its cap);
	// DatagramFlows is the current number of remembered decisions.
	DatagramDecisions uint64
	DatagramDenied    uint64
	DatagramTableFull uint64
	DatagramFlows     int
	// TrackedFlows and PendingSYNs are the current sizes of the flow
	// table: remembered passthrough flows and SYNs awaiting a decision.
	TrackedFlows int
	PendingSYNs  int
}

// Stats returns the counters of every attached NIC, ordered by ID.
func (s *Stack) Stats() []NICStats {
	s.mu.RLock()
	nics := make([]*nic, 0, len(s.nics))
	for _, n := range s.nics {
		nics = append(nics, n)
	}
	s.mu.RUnlock()
	out := make([]NICStats, 0, len(nics))
	for _, n := range nics {
		out = append(out, n.stats())
	}
	slices.SortFunc(out, func(a, b NICStats) int { return int(a.ID) - int(b.ID) })
	return out
}

// NICStats returns the counters of one NIC.
func (s *Stack) NICStats(id NICID) (NICStats, bool) {
	s.mu.RLock()
	n, ok := s.nics[id]
	s.mu.RUnlock()
	if !ok {
		return NICStats{}, false
	}
	return n.stats(), true
}

// routineExpireFlows forgets idle passthrough flows and stale pending SYNs.
// Owned by the Stack: started in New, stopped and waited for in Close.
func (s *Stack) routineExpireFlows() {
	defer close(s.janitorDone)
	idle := s.opts.FlowIdleTimeout
	interval := min(max(idle/4, 100*time.Millisecond), 30*time.Second)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.janitorStop:
			return
		case <-t.C:
		}
		s.mu.RLock()
		nics := make([]*nic, 0, len(s.nics))
		for _, n := range s.nics {
			nics = append(nics, n)
		}
		s.mu.RUnlock()
		now := s.now()
		for _, n := range nics {
			n.flows.expire(now, int64(idle), int64(pendingSYNTTL))
		}
	}
}

// nicForSource returns the NIC that owns pod address a, or nil. It also
// finds a NIC that AttachTUN has enabled but not yet published, whose
// reader may already deliver SYNs.
func (s *Stack) nicForSource(a netip.Addr) *nic {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byAddr[a]
}

// hostSubnet is the /32 or /128 subnet of a.
func hostSubnet(a netip.Addr) tcpip.Subnet {
	addr := toTCPIPAddr(a)
	mask := tcpip.MaskFromBytes(slices.Repeat([]byte{0xff}, addr.Len()))
	sn, err := tcpip.NewSubnet(addr, mask)
	if err != nil {
		panic(fmt.Sprintf("host subnet of %s: %v", a, err)) // a full mask is always valid
	}
	return sn
}

func toTCPIPAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

func fromTCPIPAddr(a tcpip.Address) netip.Addr {
	switch a.Len() {
	case 4:
		return netip.AddrFrom4(a.As4())
	case 16:
		return netip.AddrFrom16(a.As16()).Unmap()
	}
	return netip.Addr{}
}

// rateLimit lets one event per interval through; the zero value is ready.
type rateLimit struct{ last atomic.Int64 }

func (r *rateLimit) allow(now int64, interval time.Duration) bool {
	last := r.last.Load()
	if last != 0 && now-last < int64(interval) {
		return false
	}
	return r.last.CompareAndSwap(last, now)
}
