package wireguard

import (
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// GRO into the overlay stack. A Write's decrypted TCP segments for the
// overlay address go through gVisor's own GRO (stack/gro, what its fdbased
// endpoint uses): consecutive in-order segments of one flow with the same
// ACK, flags (PSH/FIN end a run), header length and options are merged into
// one packet of up to 64 KiB, so the overlay stack's TCP receives (and
// acknowledges) a few large segments instead of one per inner MTU.
//
// Checksums: a merged packet keeps its first segment's TCP checksum, so
// the overlay NIC declares RX checksum offload and this file verifies
// every TCP segment before it may be merged: a segment with a bad checksum
// is dropped and counted, never merged into a good one nor delivered. The
// offload flag also tells gVisor's IPv6 layer not to check reassembled
// fragments and TCP behind extension headers, so only what can be checked
// here reaches the overlay stack: TCP directly after the IPv6 header,
// ICMPv6 (gVisor checks its checksum whatever the flag) and "no next
// header"; anything else (extension headers, fragments, UDP) is dropped and
// counted. The overlay stack only serves the mesh tunnels (TCP), and
// gVisor's TCP never sends fragments or extension headers.

// overlayGRO is one Write's GRO. It is its own dispatcher so that it can
// count what it delivers.
type overlayGRO struct {
	gro.GRO
	in        stack.NetworkDispatcher
	enqueued  int // packets enqueued
	delivered int // packets delivered (merged ones count once)
}

func (o *overlayGRO) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	o.delivered++
	o.in.DeliverNetworkPacket(proto, pkt)
}

func (o *overlayGRO) DeliverLinkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	o.in.DeliverLinkPacket(proto, pkt)
}

var groPool = sync.Pool{New: func() any {
	o := &overlayGRO{}
	o.Init(true)
	o.Dispatcher = o
	return o
}}

func (t *TUN) getGRO() *overlayGRO {
	o := groPool.Get().(*overlayGRO)
	o.in, o.enqueued, o.delivered = t.in, 0, 0
	return o
}

// putGRO flushes o into the overlay stack and counts the segments that
// were merged into another.
func (t *TUN) putGRO(o *overlayGRO) {
	o.Flush()
	if merged := o.enqueued - o.delivered; merged > 0 {
		t.coalesced.Add(uint64(merged))
	}
	o.in = nil
	groPool.Put(o)
}

// toOverlayStack checks p, a decrypted packet for the overlay address, and
// enqueues it in g (see above for what passes).
func (t *TUN) toOverlayStack(g *overlayGRO, p []byte) {
	if len(p) < header.IPv6MinimumSize || p[0]>>4 != 6 {
		t.dropped.Add(1)
		return
	}
	validated := false
	switch tcpip.TransportProtocolNumber(p[6]) {
	case header.TCPProtocolNumber:
		if _, ok := tcp6Header(p); !ok || !tcp6ChecksumValid(p) {
			t.dropped.Add(1)
			return
		}
		validated = true
	case header.ICMPv6ProtocolNumber, noNextHeader:
	default:
		t.dropped.Add(1)
		return
	}
	// MakeWithData copies p (wireguard-go reuses its buffers) into
	// gVisor's pooled chunks.
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(p)})
	pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	pkt.RXChecksumValidated = validated
	g.enqueued++
	g.Enqueue(pkt)
	pkt.DecRef()
	t.toOverlay.Add(1)
}

// noNextHeader is IPv6's "no next header" (RFC 8200).
const noNextHeader tcpip.TransportProtocolNumber = 59
