package netstack

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// nic is one pod's TUN device attached to the Stack.
type nic struct {
	id    NICID
	name  string
	fd    int          // the TUN fd; owned, closed by Stack.removeNIC
	addrs []netip.Addr // the pod's addresses; immutable
	s     *Stack
	flows *flowTable

	child *tunEndpoint  // reads and writes the TUN
	link  *linkEndpoint // the classifying wrapper around child

	removing atomic.Bool // set before the reader is stopped

	taps atomic.Pointer[tapList] // packet taps (observe.go); nil: none

	datagrams datagramTable // non-TCP flow decisions (datagram.go)

	counters struct {
		spoofedDrops       atomic.Uint64
		otherDrops         atomic.Uint64
		passthroughPackets atomic.Uint64
		passthroughBytes   atomic.Uint64
		passthroughErrors  atomic.Uint64
		mssClamped         atomic.Uint64
		passthroughFlows   atomic.Uint64
		terminatedFlows    atomic.Uint64
		handshakeFailures  atomic.Uint64
		dialedFlows        atomic.Uint64
		refusedFlows       atomic.Uint64
		failClosedDrops    atomic.Uint64
		flowTableFull      atomic.Uint64
		timeWaitReused     atomic.Uint64
		superPackets       atomic.Uint64
	}
	spoofLog, writeLog rateLimit
}

func (n *nic) ownsAddr(a netip.Addr) bool { return slices.Contains(n.addrs, a) }

func (n *nic) stats() NICStats {
	tracked, pending := n.flows.sizes()
	c := &n.counters
	return NICStats{
		ID:                 n.id,
		Name:               n.name,
		SpoofedDrops:       c.spoofedDrops.Load(),
		OtherDrops:         c.otherDrops.Load(),
		PassthroughPackets: c.passthroughPackets.Load(),
		PassthroughBytes:   c.passthroughBytes.Load(),
		PassthroughErrors:  c.passthroughErrors.Load(),
		MSSClamped:         c.mssClamped.Load(),
		PassthroughFlows:   c.passthroughFlows.Load(),
		TerminatedFlows:    c.terminatedFlows.Load(),
		HandshakeFailures:  c.handshakeFailures.Load(),
		DialedFlows:        c.dialedFlows.Load(),
		RefusedFlows:       c.refusedFlows.Load(),
		FailClosedDrops:    c.failClosedDrops.Load(),
		FlowTableFull:      c.flowTableFull.Load(),
		TimeWaitReused:     c.timeWaitReused.Load(),
		SuperPackets:       c.superPackets.Load(),
		DatagramDecisions:  n.datagrams.decisions.Load(),
		DatagramDenied:     n.datagrams.denied.Load(),
		DatagramTableFull:  n.datagrams.full.Load(),
		DatagramFlows:      n.datagrams.size(),
		TrackedFlows:       tracked,
		PendingSYNs:        pending,
	}
}

// readerStopped is called when the TUN reader goroutine ended, either
// because the NIC is being removed or because reading the TUN failed (for
// example the pod's namespace and with it tm0 are gone).
func (n *nic) readerStopped(tcpipErr tcpip.Error) {
	if n.removing.Load() {
		return
	}
	n.s.logger.Warn("nic reader stopped; detach the nic", "nic", n.id, "name", n.name, "err", tcpipErr)
}

// linkEndpoint wraps the NIC's TUN endpoint and decides, for every inbound
// packet, whether gVisor sees it or the host does.
//
// Why a LinkEndpoint wrapper and not a custom dispatcher or a packet hook:
// it sits exactly where the decision belongs, before gVisor's IP layer
// (which, promiscuous, would answer anything with a RST), it sees whole
// packets as the pod sent them (so passthrough is byte-exact), it keeps the
// decision apart from reading and writing the TUN (tunEndpoint), and
// nested.Endpoint already handles the attach/detach locking. Outbound
// packets pass untouched.
type linkEndpoint struct {
	nested.Endpoint
	nic *nic
}

func newLinkEndpoint(child stack.LinkEndpoint, n *nic) *linkEndpoint {
	e := &linkEndpoint{nic: n}
	e.Endpoint.Init(child, e)
	return e
}

// DeliverNetworkPacket implements stack.NetworkDispatcher; the TUN reader
// calls it for every packet read from the TUN, on its own goroutine.
//
// A TCP super-packet (TSO from the pod's kernel) is decided once, as a
// whole: checkOffload makes sure all its segments share the 4-tuple and
// carry no SYN or RST, so every step below would decide each segment the
// same way. Owned ones go into gVisor whole (one large segment); passed
// through ones go to the host whole when the writer takes offloads, else
// cut into segments (passthroughOffload).
func (e *linkEndpoint) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	n := e.nic
	n.observe(false, pkt)
	data := pkt.Data()
	hdr, ok := data.PullUp(min(data.Size(), maxHeaderPullUp))
	if !ok {
		n.counters.otherDrops.Add(1)
		return
	}
	info, err := parseIP(hdr)
	if err != nil {
		n.counters.otherDrops.Add(1)
		return
	}
	// The reader's offload state is for this classifier only: gVisor
	// must see an ordinary inbound packet.
	off, err := checkOffload(pkt.GSOOptions, &info, data.Size())
	pkt.GSOOptions = stack.GSO{}
	if err != nil {
		n.counters.otherDrops.Add(1)
		return
	}
	if off.gso {
		n.counters.superPackets.Add(1)
	}
	if !n.ownsAddr(info.src) {
		n.dropForeignSource(&info)
		return
	}
	if !info.tcp {
		if n.datagramAllowed(hdr, &info) {
			n.passthrough(pkt, &info, off)
		}
		return
	}
	if ep := n.s.endpoint(n.id, &info); ep != nil {
		if !info.isPureSYN() || !n.reuseTimeWait(ep) {
			e.Endpoint.DeliverNetworkPacket(proto, pkt)
			return
		}
		// The tuple was in TIME_WAIT: freed, the SYN opens a new flow.
	}
	k := flowKey{
		src: netip.AddrPortFrom(info.src, info.sport),
		dst: netip.AddrPortFrom(info.dst, info.dport),
	}
	if info.isPureSYN() {
		keep := func() []byte {
			b := packetBytes(pkt, nil)
			if off.csum {
				// Kept for a later passthrough as a plain packet.
				finishChecksum(b, off.csumStart, off.csumOffset)
			}
			return b
		}
		if n.flows.syn(k, n.s.now(), keep) {
			n.passthrough(pkt, &info, off)
			return
		}
		// A new flow: the forwarder asks the handler.
		e.Endpoint.DeliverNetworkPacket(proto, pkt)
		return
	}
	if info.flags&(tcpFlagSYN|tcpFlagACK) == tcpFlagSYN|tcpFlagACK {
		// The pod answers a connection: always judged, even on a
		// remembered tuple. A client reusing its source port opens a new
		// connection on the old 4-tuple, and the fast path would let
		// its SYN-ACK through after a policy change denied it.
		if !n.strayAllowed(k, true) {
			n.flows.remove(k)
			n.counters.failClosedDrops.Add(1)
			return
		}
		n.passthrough(pkt, &info, off)
		return
	}
	if !n.flows.touch(k, n.s.now(), info.flags&(tcpFlagFIN|tcpFlagRST) != 0) && !n.strayAllowed(k, false) {
		n.counters.failClosedDrops.Add(1)
		return
	}
	n.passthrough(pkt, &info, off)
}

// strayAllowed decides on a segment of a flow the stack neither owns nor
// remembers, through the handler's SegmentDecider if it has one, and
// remembers a flow it lets through.
func (n *nic) strayAllowed(k flowKey, synAck bool) bool {
	sd, ok := n.s.opts.Handler.(SegmentDecider)
	if !ok {
		return true
	}
	if sd.HandleSegment(Flow{NIC: n.id, Src: k.src, Dst: k.dst, SYNACK: synAck}) != Passthrough {
		return false
	}
	if _, remembered := n.flows.promote(k, n.s.now()); !remembered {
		n.counters.flowTableFull.Add(1)
	}
	return true
}

// endpoint returns gVisor's endpoint for the packet's 4-tuple on this NIC,
// or nil: a terminated flow (registered before the handshake's SYN-ACK is
// sent), a dialed flow (registered before its SYN is sent), or one still
// closing. Packets of flows with an endpoint belong to the stack.
func (s *Stack) endpoint(id NICID, info *packetInfo) stack.TransportEndpoint {
	netProto := ipv4.ProtocolNumber
	if info.version == 6 {
		netProto = ipv6.ProtocolNumber
	}
	teid := stack.TransportEndpointID{
		LocalPort:     info.dport,
		LocalAddress:  toTCPIPAddr(info.dst),
		RemotePort:    info.sport,
		RemoteAddress: toTCPIPAddr(info.src),
	}
	return s.stack.FindTransportEndpoint(netProto, tcp.ProtocolNumber, teid, tcpip.NICID(id))
}

// reuseTimeWait frees a tuple held in TIME_WAIT when the pod opens a new
// connection on it (a pure SYN), as RFC 1122 4.2.2.13 allows and Linux
// does for its listeners. gVisor does the same only when a listening
// endpoint exists, which a forwarder is not: without this the pod's SYN
// was dropped until TIME_WAIT ended. The pod's kernel reuses a port for a
// destination after one cycle of its port range when it was not the side
// that closed first, so under churn this hung connections (issue 13, item
// 10). On a TUN from the pod's own kernel a pure SYN is never an old
// duplicate. It reports whether the tuple was freed.
func (n *nic) reuseTimeWait(ep stack.TransportEndpoint) bool {
	tep, ok := ep.(*tcp.Endpoint)
	if !ok || tep.EndpointState() != tcp.StateTimeWait {
		return false
	}
	tep.Abort()
	n.counters.timeWaitReused.Add(1)
	return true
}

// dropForeignSource drops a packet whose source is not the pod's. Sources a
// pod's kernel uses without lying (unspecified, link-local, e.g. for IPv6
// router solicitations if tm0 has a link-local address) are not counted as
// spoofing.
func (n *nic) dropForeignSource(info *packetInfo) {
	if info.src.IsUnspecified() || info.src.IsLinkLocalUnicast() {
		n.counters.otherDrops.Add(1)
		return
	}
	n.counters.spoofedDrops.Add(1)
	if n.spoofLog.allow(n.s.now(), 10*time.Second) {
		n.s.logger.Warn("dropped packet with a source that is not the pod's (further drops only counted for 10s)",
			"nic", n.id, "name", n.name, "src", info.src, "dst", info.dst, "proto", info.proto)
	}
}

// passthroughBufs hold packet copies on their way to the host.
var passthroughBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, 64<<10)
	return &b
}}

// passthrough writes the packet to the host unchanged (but for MSS
// clamping, and completing or segmenting what the host writer cannot take
// as offloads).
func (n *nic) passthrough(pkt *stack.PacketBuffer, info *packetInfo, off offload) {
	if n.s.opts.Passthrough == nil {
		n.counters.otherDrops.Add(1)
		return
	}
	bp := passthroughBufs.Get().(*[]byte)
	b := packetBytes(pkt, (*bp)[:0])
	if off.csum || off.gso {
		n.passthroughOffload(b, info, off)
	} else {
		n.writePassthrough(b, info)
	}
	*bp = b[:0]
	passthroughBufs.Put(bp)
}

// passthroughOffload passes on a packet with a partial checksum or a TCP
// super-packet. A writer that takes offloads (the host TUN in
// tun.ModeOffload) gets it as it came, and the host kernel finishes the
// checksum or segments it where it forwards it; otherwise the checksum is
// completed here and a super-packet is cut into the segments the pod's
// kernel would have sent. SYNs are never super-packets; a SYN's checksum is
// completed here before its MSS is clamped (an incremental update of a
// partial sum would be wrong).
func (n *nic) passthroughOffload(b []byte, info *packetInfo, off offload) {
	ow, canOffload := n.s.opts.Passthrough.(OffloadWriter)
	isSYN := info.tcp && info.flags&tcpFlagSYN != 0
	if canOffload && !isSYN {
		n.writeOffload(ow, b, info, off)
		return
	}
	if !off.gso {
		finishChecksum(b, off.csumStart, off.csumOffset)
		n.writePassthrough(b, info)
		return
	}
	sp := passthroughBufs.Get().(*[]byte)
	scratch := *sp
	_, err := segmentTCP(b, info, off.mss, scratch, func(seg []byte) error {
		n.writePassthrough(seg, info)
		scratch = seg
		return nil
	})
	*sp = scratch[:0]
	passthroughBufs.Put(sp)
	if err != nil {
		n.counters.otherDrops.Add(1)
	}
}

// writeOffload writes b with its offload state to an OffloadWriter.
func (n *nic) writeOffload(ow OffloadWriter, b []byte, info *packetInfo, off offload) {
	if err := ow.WriteOffload(b, off.vnetHdr(info)); err != nil {
		n.writeFailed(info, err)
		return
	}
	n.counters.passthroughPackets.Add(1)
	n.counters.passthroughBytes.Add(uint64(len(b)))
}

// writePassthrough clamps the MSS of a SYN or SYN-ACK in b (in place) and
// writes b to the host.
func (n *nic) writePassthrough(b []byte, info *packetInfo) {
	if info.tcp && info.flags&tcpFlagSYN != 0 {
		if ClampMSS(b, info.ipHdrLen, mssLimit(n.s.opts.UnderlayMTU, info.version)) {
			n.counters.mssClamped.Add(1)
		}
	}
	if err := n.s.opts.Passthrough.WritePacket(b); err != nil {
		n.writeFailed(info, err)
		return
	}
	n.observePassthrough(info)
	n.counters.passthroughPackets.Add(1)
	n.counters.passthroughBytes.Add(uint64(len(b)))
}

func (n *nic) writeFailed(info *packetInfo, err error) {
	n.counters.passthroughErrors.Add(1)
	if n.writeLog.allow(n.s.now(), 10*time.Second) {
		n.s.logger.Warn("passthrough write failed (further failures only counted for 10s)",
			"nic", n.id, "name", n.name, "src", info.src, "dst", info.dst, "err", err)
	}
}

// packetBytes appends the whole packet (at link level no header has been
// consumed yet) to dst.
func packetBytes(pkt *stack.PacketBuffer, dst []byte) []byte {
	vl, off := pkt.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		dst = append(dst, b[off:]...)
		off = 0
	}
	return dst
}
