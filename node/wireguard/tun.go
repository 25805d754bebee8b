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
	ep      *channel.Endpoint
	events  chan wgtun.Event
	out     chan []byte // packets for wireguard-go to encrypt

	// host receives decrypted packets that are not for the overlay
	// address and whose destination hostDst allows; nil drops them.
	host atomic.Pointer[hostSink]

	closeOnce sync.Once
	closed    chan struct{}

	// Counters (read with Stats).
	toOverlay, toHost, fromHost, dropped, dropFull, tooBig atomic.Uint64
}

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
		ep:     channel.New(4096, uint32(mtu), ""),
		events: make(chan wgtun.Event, 4),
		out:    make(chan []byte, 4096),
		closed: make(chan struct{}),
	}
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
	p := append([]byte(nil), b...)
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
		p := append([]byte(nil), v.AsSlice()...)
		v.Release()
		pkt.DecRef()
		select {
		case t.out <- p:
		case <-t.closed:
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
// up to len(bufs).
func (t *TUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	var p []byte
	select {
	case p = <-t.out:
	case <-t.closed:
		return 0, os.ErrClosed
	}
	n := 0
	for {
		if len(p) > len(bufs[n])-offset {
			t.dropped.Add(1) // larger than wireguard-go's buffers: cannot be carried
		} else {
			sizes[n] = copy(bufs[n][offset:], p)
			n++
		}
		if n == len(bufs) {
			return n, nil
		}
		select {
		case p = <-t.out:
		default:
			return n, nil
		}
	}
}

// Write takes decrypted packets. Every packet is consumed (delivered or
// dropped and counted); wireguard-go has already checked that its source
// is one the sending peer may use.
func (t *TUN) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		t.deliver(b[offset:])
	}
	return len(bufs), nil
}

func (t *TUN) deliver(p []byte) {
	dst, proto, ok := packetDst(p)
	if !ok {
		t.dropped.Add(1)
		return
	}
	if dst == t.overlay {
		pkb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(append([]byte(nil), p...))})
		t.ep.InjectInbound(proto, pkb)
		pkb.DecRef()
		t.toOverlay.Add(1)
		return
	}
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
		Dropped: t.dropped.Load(), QueueFull: t.dropFull.Load(), TooBig: t.tooBig.Load()}
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
