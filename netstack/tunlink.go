package netstack

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tunmesh/tunmesh/netstack/rawio"
	"github.com/tunmesh/tunmesh/netstack/tun"
)

// tunEndpoint is the link endpoint of one pod TUN: gVisor's side of tm0. It
// replaces fdbased for TUNs for three reasons:
//
//   - Offloads. On a tun.ModeOffload fd every packet carries a virtio net
//     header. Reads can be TCP super-packets (TSO from the pod's kernel),
//     delivered to gVisor whole as one large segment, and TCP checksums may
//     be partial (the pod's kernel skipped them; gVisor is told checksums
//     are verified, as before). Writes declare host GSO to gVisor, so its
//     TCP hands over up to 64 KiB per packet with a partial checksum and the
//     pod's kernel takes it as one skb. fdbased's GSO is written for
//     packet sockets (it puts an Ethernet header before csum_start), so it
//     cannot be used on a TUN.
//   - No OS thread per pod. The fd is non-blocking and read through Go's
//     netpoller (an *os.File), so an idle pod costs a parked goroutine, not
//     a thread blocked in read (go-deps pitfall 7).
//   - Packets are delivered to the dispatcher (the classifying linkEndpoint)
//     on the reader goroutine itself: no hand-off between read and decision.
//
// The *os.File wraps a duplicate of the NIC's fd that this endpoint owns and
// closes (Close); the Stack keeps owning the original. An *os.File closes
// its fd when collected, so no one else may hold this fd (go-deps pitfall 8);
// the duplicate makes that true, and also lets AttachTUN fail without
// closing the caller's fd. Writes go through the same *os.File, so a write
// racing with Close fails cleanly instead of hitting a reused fd number.
type tunEndpoint struct {
	file    *os.File
	rc      syscall.RawConn
	offload bool // the fd is in tun.ModeOffload
	mtu     atomic.Uint32
	// stopped is called when the reader ends because
	// reading failed (not when Attach(nil) stopped it).
	stopped func(tcpip.Error)

	// mu guards the reader's lifecycle: Attach starts and stops it.
	mu         sync.Mutex
	closed     bool // set by Close: no reader starts again
	dispatcher stack.NetworkDispatcher
	stopping   atomic.Bool   // set by Attach(nil) before it interrupts the read
	done       chan struct{} // closed when the running reader returns; nil if none

	w tunWriter

	closeOnce sync.Once
}

// State, drawn: new (no reader) -> reading (Attach(d)) -> new (Attach(nil))
// ... -> closed (Close; Attach starts nothing any more). A read error moves
// reading to a stopped reader that the next Attach restarts.

// gsoMaxSize bounds the super-packets gVisor hands the endpoint: an IPv4
// total length must fit in 16 bits, and the pod's kernel takes no more than
// 64 KiB from a TUN write.
const gsoMaxSize = 0xffff

// readBufSize holds the largest packet a TUN delivers (an IP packet is at most
// 64 KiB; GSO super-packets are limited to that too) plus its header.
const readBufSize = tun.VnetHdrLen + 0xffff + 1

// newTUNEndpoint makes the endpoint for fd (an IFF_TUN|IFF_NO_PI fd in either
// mode). It does not take fd: it duplicates it.
func newTUNEndpoint(fd int, mtu uint32, stopped func(tcpip.Error)) (*tunEndpoint, error) {
	mode, err := tun.FDMode(fd)
	if err != nil {
		return nil, err
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup tun fd %d: %w", fd, err)
	}
	// O_NONBLOCK lives on the open file description, shared with fd:
	// everything in this package reads and writes that fd through the
	// poller, and the caller hands it over.
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("tun fd %d non-blocking: %w", fd, err)
	}
	// A non-blocking fd makes os.NewFile register it with the netpoller.
	f := os.NewFile(uintptr(dup), "tun")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("tun fd %d raw conn: %w", fd, err)
	}
	e := &tunEndpoint{file: f, rc: rc, offload: mode == tun.ModeOffload, stopped: stopped}
	e.mtu.Store(mtu)
	return e, nil
}

// MTU implements stack.LinkEndpoint.
func (e *tunEndpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.
func (e *tunEndpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint: a TUN has no link header
// (the virtio header is written from a separate buffer).
func (*tunEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint.
func (*tunEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.LinkEndpoint.
func (*tunEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint. RX checksums are not checked
// by gVisor: the pod's kernel made the packets (and with offloads it leaves
// TCP checksums partial: there is nothing to check). TX checksums are
// computed by gVisor except where host GSO makes them partial with
// VnetFlagNeedsCsum.
func (*tunEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// GSOMaxSize implements stack.GSOEndpoint.
func (e *tunEndpoint) GSOMaxSize() uint32 {
	if e.offload {
		return gsoMaxSize
	}
	return 0
}

// SupportedGSO implements stack.GSOEndpoint.
func (e *tunEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.offload {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// ARPHardwareType implements stack.LinkEndpoint.
func (*tunEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint.
func (*tunEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.
func (*tunEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// SetOnCloseAction implements stack.LinkEndpoint.
func (*tunEndpoint) SetOnCloseAction(func()) {}

// IsAttached implements stack.LinkEndpoint.
func (e *tunEndpoint) IsAttached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dispatcher != nil
}

// Attach implements stack.LinkEndpoint: a dispatcher starts the reader, nil
// stops it and waits until it has returned (so no packet is delivered after
// Attach(nil) returns).
func (e *tunEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if d == nil {
		e.stopReaderLocked()
		e.dispatcher = nil
		return
	}
	// A new dispatcher replaces the old one: the reader is handed its
	// dispatcher when started, so restart it.
	e.stopReaderLocked()
	if e.closed {
		return
	}
	e.dispatcher = d
	e.stopping.Store(false)
	done := make(chan struct{})
	e.done = done
	go e.routineReadTUN(d, done)
}

// stopReaderLocked interrupts the reader with a past read deadline and waits
// for it.
func (e *tunEndpoint) stopReaderLocked() {
	if e.done == nil {
		return
	}
	e.stopping.Store(true)
	_ = e.file.SetReadDeadline(time.Unix(1, 0))
	<-e.done
	e.done = nil
	_ = e.file.SetReadDeadline(time.Time{})
}

// Wait implements stack.LinkEndpoint.
func (e *tunEndpoint) Wait() {
	e.mu.Lock()
	done := e.done
	e.mu.Unlock()
	if done != nil {
		<-done
	}
}

// Close implements stack.LinkEndpoint: it stops the reader and closes the
// endpoint's fd. Idempotent.
func (e *tunEndpoint) Close() {
	e.closeOnce.Do(func() {
		e.mu.Lock()
		e.closed = true
		e.stopReaderLocked()
		e.dispatcher = nil
		e.mu.Unlock()
		e.file.Close()
	})
}

// readBufs hold one packet on its way from the TUN into a PacketBuffer.
// Shared by all NICs and taken only once a TUN is readable, so an idle pod
// holds no buffer (64 KiB each: 6.4 MiB at 100 pods otherwise).
var readBufs = sync.Pool{New: func() any {
	b := make([]byte, readBufSize)
	return &b
}}

// routineReadTUN reads packets and delivers each to d on this goroutine.
// Owned by the endpoint: started by Attach, stopped and waited for by
// Attach(nil) (hence by RemoveNIC and Close).
func (e *tunEndpoint) routineReadTUN(d stack.NetworkDispatcher, done chan struct{}) {
	defer close(done)
	r := &tunReader{}
	r.read = r.readFD
	for {
		bp, n, err := r.next(e.rc)
		if err != nil {
			if !e.stopping.Load() && e.stopped != nil {
				e.stopped(tcpipError(err))
			}
			return
		}
		pkt := (*bp)[:n]
		var vh tun.VnetHdr
		if e.offload {
			vh, err = tun.DecodeVnetHdr(pkt)
			pkt = pkt[min(n, tun.VnetHdrLen):]
		}
		if err == nil {
			e.deliver(d, pkt, vh)
		}
		readBufs.Put(bp)
	}
}

// tunReader is the reader goroutine's state, kept across reads so that a
// read allocates nothing (the RawConn callback is bound once).
type tunReader struct {
	bp   *[]byte
	n    int
	err  error
	read func(fd uintptr) bool // r.readFD
}

// next reads one packet (with its header in offload mode) into a buffer from
// readBufs, through the netpoller: a goroutine parked on an idle TUN holds
// neither an OS thread nor a buffer. The caller returns the buffer.
func (r *tunReader) next(rc syscall.RawConn) (*[]byte, int, error) {
	r.bp, r.n, r.err = nil, 0, nil
	err := rc.Read(r.read)
	if err == nil && r.err == nil && r.n == 0 {
		err = errors.New("tun read: end of file")
	}
	if err == nil {
		err = r.err
	}
	bp := r.bp
	r.bp = nil
	if err != nil {
		if bp != nil {
			readBufs.Put(bp)
		}
		return nil, 0, err
	}
	return bp, r.n, nil
}

// readFD is the raw read, called by the RawConn when the fd may be readable;
// it reports false (park until readable) on EAGAIN, handing the buffer back
// first.
func (r *tunReader) readFD(fd uintptr) bool {
	if r.bp == nil {
		r.bp = readBufs.Get().(*[]byte)
	}
	// A raw read: no runtime.entersyscall, so a message arriving at an
	// idle agent does not wake the runtime's sysmon (see package rawio).
	r.n, r.err = rawio.Read(fd, *r.bp)
	if r.err == unix.EAGAIN {
		readBufs.Put(r.bp)
		r.bp = nil
		return false
	}
	return true
}

// deliver copies one packet into a PacketBuffer (exactly sized, from
// gVisor's pools: the read buffer is reused) and hands it to d. The virtio
// header's offload state travels in pkt.GSOOptions (see vnetToGSO) for the
// classifier, which clears it before gVisor's IP layer sees the packet.
func (e *tunEndpoint) deliver(d stack.NetworkDispatcher, b []byte, vh tun.VnetHdr) {
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(b) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	pkt.GSOOptions = vnetToGSO(vh)
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}

// WritePackets implements stack.LinkEndpoint. Packets are written one per
// syscall (a TUN takes no more), under w.mu: the fd's write lock serializes
// writers anyway, and holding the per-endpoint state lets every write reuse
// its header, iovec slice and callback instead of allocating them (this runs
// for every segment and ACK).
func (e *tunEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	w := &e.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.write == nil {
		w.write = w.writev
	}
	n := 0
	for _, pkt := range pkts.AsSlice() {
		w.iovs = w.iovs[:0]
		if e.offload {
			gsoToVnet(pkt).Encode(w.hdr[:])
			w.iovs = append(w.iovs, w.hdr[:])
		}
		w.iovs = appendSlices(w.iovs, pkt)
		w.err = nil
		err := e.rc.Write(w.write)
		if err == nil {
			err = w.err
		}
		clear(w.iovs) // drop references to the packet's views
		if err != nil {
			if n == 0 {
				return 0, tcpipError(err)
			}
			break
		}
		n++
	}
	return n, nil
}

// tunWriter is a tunEndpoint's reusable write state.
type tunWriter struct {
	mu    sync.Mutex
	hdr   [tun.VnetHdrLen]byte
	iovs  [][]byte
	iov   []unix.Iovec // writev's scratch, reused
	err   error
	write func(fd uintptr) bool // w.writev, bound once
}

// writev is the raw write of w.iovs, called by the fd's RawConn with its
// write lock held; it reports false (wait for writability) on EAGAIN.
func (w *tunWriter) writev(fd uintptr) bool {
	_, w.iov, w.err = rawio.Writev(fd, w.iovs, w.iov) // raw, as reads (see package rawio)
	return w.err != unix.EAGAIN
}

// appendSlices appends the packet's bytes (headers and data, as views of its
// storage, not copies) to dst without allocating more than dst's growth.
func appendSlices(dst [][]byte, pkt *stack.PacketBuffer) [][]byte {
	vl, off := pkt.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		dst = append(dst, b[off:])
		off = 0
	}
	return dst
}

// gsoToVnet is the virtio header for a packet gVisor writes. With host GSO
// every TCP packet of an established endpoint has a partial checksum
// (NeedsCsum: gVisor wrote only the pseudo-header sum), and one larger than
// its MSS is a super-packet for the pod's kernel to take whole.
func gsoToVnet(pkt *stack.PacketBuffer) tun.VnetHdr {
	g := pkt.GSOOptions
	var h tun.VnetHdr
	if g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6 {
		return h
	}
	if g.NeedsCsum {
		h.Flags = tun.VnetFlagNeedsCsum
		h.CsumStart = g.L3HdrLen
		h.CsumOffset = g.CsumOffset
	}
	if pkt.Data().Size() > int(g.MSS) {
		h.GSOType = tun.VnetGSOTCPv4
		if g.Type == stack.GSOTCPv6 {
			h.GSOType = tun.VnetGSOTCPv6
		}
		h.GSOSize = g.MSS
		h.HdrLen = uint16(pkt.HeaderSize())
	}
	return h
}

// vnetToGSO carries a read packet's virtio header to the classifier in the
// PacketBuffer's GSO field (gVisor ignores it on inbound packets, and the
// classifier clears it anyway): Type says super-packet (TCPv4/TCPv6, with MSS
// the segment size), NeedsCsum a partial checksum at L3HdrLen+CsumOffset.
// The values are the pod's word, unchecked; the classifier validates them
// against the packet (checkOffload).
func vnetToGSO(h tun.VnetHdr) stack.GSO {
	var g stack.GSO
	switch h.GSOType &^ tun.VnetGSOECN {
	case tun.VnetGSONone:
	case tun.VnetGSOTCPv4:
		g.Type = stack.GSOTCPv4
	case tun.VnetGSOTCPv6:
		g.Type = stack.GSOTCPv6
	default:
		// UDP or unknown: a kind this stack never negotiated. Marked so
		// the classifier drops it.
		g.Type = stack.GSOGvisor
	}
	g.MSS = h.GSOSize
	if h.Flags&tun.VnetFlagNeedsCsum != 0 {
		g.NeedsCsum = true
		g.L3HdrLen = h.CsumStart
		g.CsumOffset = h.CsumOffset
	}
	return g
}

// tcpipError converts a read or write error for gVisor.
func tcpipError(err error) tcpip.Error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return tcpip.TranslateErrno(errno)
	}
	if errors.Is(err, os.ErrClosed) {
		return &tcpip.ErrClosedForSend{}
	}
	return &tcpip.ErrAborted{}
}
