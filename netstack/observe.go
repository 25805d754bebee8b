package netstack

import (
	"net/netip"
	"slices"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// PacketTap sees a copy of every packet crossing a pod's TUN, in both
// directions: out is true for packets the stack writes to the pod. The
// slice is only valid during the call (it is reused): a tap copies what it
// keeps and never blocks, because it runs on the data path (the TUN reader
// or a writer of the stack). Taps exist only while someone captures, so a
// NIC without one pays a single atomic load per packet.
type PacketTap func(out bool, pkt []byte)

// tapList is a NIC's taps, replaced whole (copy on write).
type tapList struct {
	taps []*tapEntry
}

type tapEntry struct{ fn PacketTap }

// tapMu serializes changes to the NICs' tap lists (readers load them
// atomically without it).
var tapMu sync.Mutex

// TapNIC adds tap to the NIC id until the returned stop is called (stop is
// idempotent). ErrUnknownNIC if id is not attached.
func (s *Stack) TapNIC(id NICID, tap PacketTap) (stop func(), err error) {
	s.mu.RLock()
	n := s.nics[id]
	s.mu.RUnlock()
	if n == nil {
		return nil, ErrUnknownNIC
	}
	e := &tapEntry{fn: tap}
	tapMu.Lock()
	old := n.taps.Load()
	next := &tapList{}
	if old != nil {
		next.taps = slices.Clone(old.taps)
	}
	next.taps = append(next.taps, e)
	n.taps.Store(next)
	tapMu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			tapMu.Lock()
			defer tapMu.Unlock()
			cur := n.taps.Load()
			if cur == nil {
				return
			}
			next := &tapList{taps: slices.DeleteFunc(slices.Clone(cur.taps), func(x *tapEntry) bool { return x == e })}
			if len(next.taps) == 0 {
				next = nil
			}
			n.taps.Store(next)
		})
	}, nil
}

// tapBufs recycles the copies handed to taps.
var tapBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// observe hands pkt to the NIC's taps, if any.
func (n *nic) observe(out bool, pkt *stack.PacketBuffer) {
	l := n.taps.Load()
	if l == nil {
		return
	}
	bp := tapBufs.Get().(*[]byte)
	b := packetBytes(pkt, (*bp)[:0])
	for _, e := range l.taps {
		e.fn(out, b)
	}
	*bp = b[:0]
	tapBufs.Put(bp)
}

// WritePackets implements stack.LinkEndpoint: packets the stack sends to
// the pod, shown to the NIC's taps before they are written.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if e.nic.taps.Load() != nil {
		for _, pkt := range pkts.AsSlice() {
			e.nic.observe(true, pkt)
		}
	}
	return e.Endpoint.WritePackets(pkts)
}

// PassthroughSYN reports a SYN-ACK that a pod sends through to the host: a
// connection from outside the mesh (a plaintext peer, a kubelet probe)
// reached the pod on its primary interface and the pod accepted it. Src is
// the pod's side. Called on the data path: it must not block.
type PassthroughSYN func(nic NICID, src, dst netip.AddrPort)

// observePassthrough tells Options.OnPassthroughSYNACK about a passed
// through SYN-ACK.
func (n *nic) observePassthrough(info *packetInfo) {
	f := n.s.opts.OnPassthroughSYNACK
	if f == nil || !info.tcp || info.flags&(tcpFlagSYN|tcpFlagACK) != tcpFlagSYN|tcpFlagACK {
		return
	}
	f(n.id, netip.AddrPortFrom(info.src, info.sport), netip.AddrPortFrom(info.dst, info.dport))
}
