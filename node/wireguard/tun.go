package wireguard

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// DefaultMTU is the inner MTU: a 1500-byte underlay minus WireGuard's
// overhead over IPv4 or IPv6 (80 bytes at most).
const DefaultMTU = 1420

// BatchSize is how many packets one Read or Write of the TUN moves
// (wireguard-go's conn.IdealBatchSize): wireguard-go encrypts and sends a
// whole batch with one sendmmsg (and UDP GSO where the kernel has it).
const BatchSize = 128

// overlayNIC is the only NIC of the overlay stack.
const overlayNIC tcpip.NICID = 1

// TUN is the WireGuard device's TUN, served in process. Packets
// wireguard-go decrypts go (Write) to the overlay stack when they are for
// the node's overlay address, or to the host sink (encrypt-all: pod
// traffic, handed to the node's kernel); anything else is dropped and
// counted. Packets to encrypt come (Read) from the overlay stack and from
// SendHost. It implements wireguard-go's tun.Device with BatchSize > 1.
type TUN struct {
	mtu     int
	overlay netip.Addr
	st      *stack.Stack
	ep      *overlayLink
	// in receives what Write's GRO delivers: the overlay stack's NIC
	// (through ep); a recorder in tests.
	in     stack.NetworkDispatcher
	events chan wgtun.Event
	out    chan outPacket // packets for wireguard-go to encrypt

	// pend is the overlay stack's packet Read is cutting into segments
	// (only Read touches it: wireguard-go reads from one goroutine).
	pend    superPacket
	pendBuf outPacket // holds pend's bytes
	pending bool

	// host receives decrypted packets that are not for the overlay
	// address and whose destination hostDst allows; nil drops them.
	host atomic.Pointer[hostSink]

	closeOnce sync.Once
	closed    chan struct{}

	// Counters (read with Stats).
	toOverlay, toHost, fromHost, dropped, dropFull, tooBig, split, coalesced atomic.Uint64
}

// outPacket is a packet for wireguard-go to encrypt.
type outPacket struct {
	b []byte
	// v, if set, holds b (a packet of the overlay stack, in gVisor's
	// pooled buffers): released once Read has taken b.
	v *buffer.View
	// gso: a packet of the overlay stack's TCP (partial checksum, maybe
	// larger than the MTU), cut by Read into segments of at most mss
	// payload bytes (0: what the MTU leaves).
	gso bool
	mss int
}

// overlayLink is the overlay stack's link: a channel endpoint whose
// "hardware" segments TCP (Read does) up to gsoMaxSize and checks TCP
// checksums (Write does, before GRO), and which hands the NIC's
// dispatcher to Write's GRO.
type overlayLink struct {
	*channel.Endpoint
	mu sync.RWMutex
	d  stack.NetworkDispatcher
}

// Attach records the NIC's dispatcher for DeliverNetworkPacket.
func (l *overlayLink) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.d = d
	l.mu.Unlock()
	l.Endpoint.Attach(d)
}

func (l *overlayLink) dispatcher() stack.NetworkDispatcher {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.d
}

// DeliverNetworkPacket hands pkt to the overlay stack (dropped while the
// NIC is detached).
func (l *overlayLink) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d := l.dispatcher(); d != nil {
		d.DeliverNetworkPacket(proto, pkt)
	}
}

// DeliverLinkPacket is for packet sockets, which the overlay stack has none of.
func (l *overlayLink) DeliverLinkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d := l.dispatcher(); d != nil {
		d.DeliverLinkPacket(proto, pkt)
	}
}

// GSOMaxSize is gsoMaxSize (the channel endpoint says 32 KiB).
func (*overlayLink) GSOMaxSize() uint32 { return gsoMaxSize }

type hostSink struct {
	write func([]byte) error
	allow func(dst netip.Addr) bool
}

// TUNStats are the TUN's counters.
type TUNStats struct {
	ToOverlay, ToHost, FromHost uint64
	// Dropped are decrypted packets for no one (not the overlay address,
	// no host sink or a destination it refuses, malformed); QueueFull are
	// packets to encrypt dropped because wireguard-go did not keep up.
	Dropped, QueueFull uint64
	// TooBig are packets from the host larger than the inner MTU with DF
	// set, answered with ICMP fragmentation needed instead.
	TooBig uint64
	// Split are the segments Read cut from the overlay stack's large
	// packets beyond the first of each (GSO); Coalesced the TCP segments
	// for the overlay stack Write merged into a previous one (GRO).
	Split, Coalesced uint64
}

// NewTUN makes the TUN and its overlay stack with the given overlay
// address (an IPv6 address in OverlayPrefix) and inner MTU.
func NewTUN(overlay netip.Addr, mtu int) (*TUN, error) {
	if !overlay.Is6() || mtu < 1280 || mtu > 65535 {
		return nil, fmt.Errorf("wireguard tun: overlay %s mtu %d: want an IPv6 address and 1280 <= mtu <= 65535", overlay, mtu)
	}
	t := &TUN{
		mtu:     mtu,
		overlay: overlay,
		st: stack.New(stack.Options{
			NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
			TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		}),
		ep:     &overlayLink{Endpoint: channel.New(4096, uint32(mtu), "")},
		events: make(chan wgtun.Event, 4),
		out:    make(chan outPacket, 4096),
		closed: make(chan struct{}),
	}
	t.ep.SupportedGSOKind = stack.HostGSOSupported
	t.ep.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	t.in = t.ep
	sack := tcpip.TCPSACKEnabled(true)
	if tcpipErr := t.st.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: tcp sack: %s", tcpipErr)
	}
	// Tunnels carry bulk pod traffic: windows as large as the pod stack's.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	if tcpipErr := t.st.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: tcp receive buffer: %s", tcpipErr)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	if tcpipErr := t.st.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: tcp send buffer: %s", tcpipErr)
	}
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	if tcpipErr := t.st.SetTransportProtocolOption(tcp.ProtocolNumber, &mod); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: tcp moderate receive buffer: %s", tcpipErr)
	}
	t.ep.AddNotify(t)
	if tcpipErr := t.st.CreateNIC(overlayNIC, t.ep); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: create nic: %s", tcpipErr)
	}
	pa := tcpip.ProtocolAddress{Protocol: ipv6.ProtocolNumber, AddressWithPrefix: tcpip.AddrFrom16(overlay.As16()).WithPrefix()}
	if tcpipErr := t.st.AddProtocolAddress(overlayNIC, pa, stack.AddressProperties{}); tcpipErr != nil {
		return nil, fmt.Errorf("wireguard tun: overlay address %s: %s", overlay, tcpipErr)
	}
	sub, err := tcpip.NewSubnet(tcpip.AddrFrom16(OverlayPrefix.Addr().As16()), tcpip.MaskFromBytes(net6Mask(OverlayPrefix.Bits())))
	if err != nil {
		return nil, fmt.Errorf("wireguard tun: overlay subnet: %w", err)
	}
	t.st.SetRouteTable([]tcpip.Route{{Destination: sub, NIC: overlayNIC}})
	t.events <- wgtun.EventUp
	return t, nil
}

func net6Mask(bits int) []byte {
	m := make([]byte, 16)
	for i := 0; i < bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// Stack is the overlay stack (dial and listen with gonet).
func (t *TUN) Stack() *stack.Stack { return t.st }

// Overlay is the overlay address.
func (t *TUN) Overlay() netip.Addr { return t.overlay }

// SetHost sets (or with nil write, removes) where decrypted packets that
// are not for the overlay address go, and which destinations may go there.
func (t *TUN) SetHost(write func([]byte) error, allow func(dst netip.Addr) bool) {
	if write == nil || allow == nil {
		t.host.Store(nil)
		return
	}
	t.host.Store(&hostSink{write: write, allow: allow})
}

// SendHost queues a packet from the node (encrypt-all) for encryption. It
// copies b. It drops (counted) when wireguard-go does not keep up, as a
// full device queue would.
func (t *TUN) SendHost(b []byte) {
	p := outPacket{b: append([]byte(nil), b...)}
	select {
	case t.out <- p:
		t.fromHost.Add(1)
	case <-t.closed:
	default:
		t.dropFull.Add(1)
	}
}

// WriteNotify is called by the channel endpoint when the overlay stack
// sends a packet: it moves to the queue wireguard-go reads. It blocks while
// the queue is full, which slows the overlay stack's senders down instead
// of dropping their segments.
func (t *TUN) WriteNotify() {
	for {
		pkt := t.ep.Read()
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		p := outPacket{b: v.AsSlice(), v: v}
		if g := pkt.GSOOptions; g.Type == stack.GSOTCPv4 || g.Type == stack.GSOTCPv6 {
			p.gso, p.mss = true, int(g.MSS)
		}
		pkt.DecRef()
		select {
		case t.out <- p:
		case <-t.closed:
			v.Release()
			return
		}
	}
}

// File is nil: there is no kernel device.
func (t *TUN) File() *os.File { return nil }

// Name names the device in wireguard-go's logs.
func (t *TUN) Name() (string, error) { return "tunmesh-wg", nil }

// MTU is the inner MTU.
func (t *TUN) MTU() (int, error) { return t.mtu, nil }

// Events reports EventUp once; closed by Close.
func (t *TUN) Events() <-chan wgtun.Event { return t.events }

// BatchSize is BatchSize.
func (t *TUN) BatchSize() int { return BatchSize }

// Read blocks for one packet to encrypt, then takes what else is queued,
// up to len(bufs). The overlay stack's large TCP packets are cut into
// inner-MTU segments here (see gso.go), across Reads when the batch is
// full. wireguard-go calls Read from one goroutine; it is not safe for
// concurrent use.
func (t *TUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n := 0
	for n < len(bufs) {
		if !t.pending {
			var p outPacket
			if n == 0 {
				select {
				case p = <-t.out:
				case <-t.closed:
					return 0, os.ErrClosed
				}
			} else {
				select {
				case p = <-t.out:
				default:
					return n, nil
				}
			}
			if !p.gso {
				if len(p.b) > len(bufs[n])-offset {
					t.dropped.Add(1) // larger than wireguard-go's buffers: cannot be carried
				} else {
					sizes[n] = copy(bufs[n][offset:], p.b)
					n++
				}
				p.release()
				continue
			}
			sp, ok := newSuperPacket(p.b, p.mss, t.mtu)
			if !ok {
				t.dropped.Add(1) // its checksum is partial: never sent as it is
				p.release()
				continue
			}
			t.pend, t.pendBuf, t.pending = sp, p, true
		}
		cut := t.pend.cut
		size := t.pend.next(bufs[n][offset:])
		if size == 0 {
			t.dropped.Add(1) // wireguard-go's buffers are smaller than the MTU
			t.endPending()
			continue
		}
		if cut {
			t.split.Add(1)
		}
		sizes[n] = size
		n++
		if t.pend.done() {
			t.endPending()
		}
	}
	return n, nil
}

func (t *TUN) endPending() {
	t.pendBuf.release()
	t.pend, t.pendBuf, t.pending = superPacket{}, outPacket{}, false
}

func (p outPacket) release() {
	if p.v != nil {
		p.v.Release()
	}
}

// Write takes decrypted packets. Every packet is consumed (delivered or
// dropped and counted); wireguard-go has already checked that its source
// is one the sending peer may use. Consecutive TCP segments of one flow
// for the overlay address are coalesced into one packet (GRO, see
// gro.go) before the overlay stack sees them. wireguard-go writes from one
// goroutine per peer: concurrent Writes each have their own GRO.
func (t *TUN) Write(bufs [][]byte, offset int) (int, error) {
	var g *overlayGRO
	for _, b := range bufs {
		p := b[offset:]
		dst, _, ok := packetDst(p)
		if !ok {
			t.dropped.Add(1)
			continue
		}
		if dst == t.overlay {
			if g == nil {
				g = t.getGRO()
			}
			t.toOverlayStack(g, p)
			continue
		}
		t.toHostSink(dst, p)
	}
	if g != nil {
		t.putGRO(g)
	}
	return len(bufs), nil
}

func (t *TUN) toHostSink(dst netip.Addr, p []byte) {
	if h := t.host.Load(); h != nil && h.allow(dst) {
		if err := h.write(p); err == nil {
			t.toHost.Add(1)
			return
		}
	}
	t.dropped.Add(1)
}

// packetDst is an IP packet's destination and network protocol.
func packetDst(p []byte) (netip.Addr, tcpip.NetworkProtocolNumber, bool) {
	if len(p) == 0 {
		return netip.Addr{}, 0, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < header.IPv4MinimumSize {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom4([4]byte(p[16:20])), ipv4.ProtocolNumber, true
	case 6:
		if len(p) < header.IPv6MinimumSize {
			return netip.Addr{}, 0, false
		}
		return netip.AddrFrom16([16]byte(p[24:40])), ipv6.ProtocolNumber, true
	}
	return netip.Addr{}, 0, false
}

// Stats returns the counters.
func (t *TUN) Stats() TUNStats {
	return TUNStats{ToOverlay: t.toOverlay.Load(), ToHost: t.toHost.Load(), FromHost: t.fromHost.Load(),
		Dropped: t.dropped.Load(), QueueFull: t.dropFull.Load(), TooBig: t.tooBig.Load(), Split: t.split.Load(), Coalesced: t.coalesced.Load()}
}

// ErrTUNClosed is returned after Close.
var ErrTUNClosed = errors.New("wireguard tun closed")

// Close stops the overlay stack and ends Read. Idempotent; wireguard-go's
// device.Close calls it.
func (t *TUN) Close() error {
	t.closeOnce.Do(func() {
		close(t.closed)
		t.st.Close()
		t.ep.Close()
		close(t.events)
	})
	return nil
}
