// Package capture writes a pod's packets as pcapng, live, for `tunmeshctl
// capture`. Two sides:
//
//   - pod: what the application sees, in plaintext. Interface "tm0" shows
//     every packet between the pod and the agent's netstack (meshed flows
//     before encryption and after decryption, and the pod's outgoing
//     packets of passed-through flows); interface "eth0" shows the pod's
//     primary interface, read with a packet socket inside the pod's network
//     namespace (plaintext peers, kubelet probes, replies of passed-through
//     flows). Off-cluster traffic shows there too.
//   - wire: what leaves the node for that pod's flows: the mTLS tunnel
//     connections (TCP on the mesh port) between this node and the nodes
//     the pod exchanges meshed connections with, read with a packet socket
//     in the node's namespace. A pooled tunnel connection also carries
//     other pods' streams of the same identity pair: encrypted all the same.
//
// A capture never holds up the data path: packet sources hand copies to a
// bounded queue without waiting and count what does not fit; the writer
// drains the queue at the reader's pace. It ends at its duration, packet
// count or byte cap, when the reader goes away, or when ctx ends.
package capture

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Side selects what a capture shows.
type Side string

const (
	SidePod  Side = "pod"
	SideWire Side = "wire"
	SideBoth Side = "both"
)

// ParseSide checks a side's name.
func ParseSide(s string) (Side, error) {
	switch Side(s) {
	case SidePod, SideWire, SideBoth:
		return Side(s), nil
	case "":
		return SidePod, nil
	}
	return "", fmt.Errorf("capture side %q: want pod, wire or both", s)
}

// Limits bound a capture.
const (
	DefaultDuration = 30 * time.Second
	MaxDuration     = 10 * time.Minute
	DefaultMaxBytes = 64 << 20
	MaxMaxBytes     = 1 << 30
	// Snaplen caps the bytes kept of one packet (a TSO super-packet from
	// tm0 can be 64 KiB).
	Snaplen = 65536 + 128
	// queueLen packets, of queueBytes in all, wait for the writer; more
	// are dropped (a stalled capture holds at most queueBytes).
	queueLen   = 4096
	queueBytes = 16 << 20
	// WriteGrace is how long one write to the reader may block: a reader
	// that stops reading ends the capture (and frees its taps and packet
	// sockets) after at most this, and never later than the capture's
	// duration plus this.
	WriteGrace = 10 * time.Second
)

// Request is one capture.
type Request struct {
	Side Side
	// Port keeps only TCP/UDP packets with this port on either end (0:
	// all packets).
	Port uint16
	// Duration, MaxPackets and MaxBytes end the capture (zero: the
	// defaults DefaultDuration, no packet cap, DefaultMaxBytes).
	Duration   time.Duration
	MaxPackets int
	MaxBytes   int64
	// WriteDeadline, if set, bounds the writes to the reader
	// (http.ResponseController.SetWriteDeadline): the deadline is the
	// capture's end plus Grace, and at most Grace after each batch starts,
	// so a stalled reader cannot keep a capture running.
	WriteDeadline func(time.Time) error
	// Grace overrides WriteGrace (tests).
	Grace time.Duration
}

// Normalize applies the defaults and the caps.
func (r *Request) Normalize() error {
	if r.Side == "" {
		r.Side = SidePod
	}
	if _, err := ParseSide(string(r.Side)); err != nil {
		return err
	}
	if r.Duration <= 0 {
		r.Duration = DefaultDuration
	}
	if r.Duration > MaxDuration {
		return fmt.Errorf("capture duration %s: at most %s", r.Duration, MaxDuration)
	}
	if r.MaxPackets < 0 {
		return errors.New("capture packet count: negative")
	}
	if r.MaxBytes <= 0 {
		r.MaxBytes = DefaultMaxBytes
	}
	if r.MaxBytes > MaxMaxBytes {
		return fmt.Errorf("capture size %d: at most %d bytes", r.MaxBytes, int64(MaxMaxBytes))
	}
	return nil
}

// Source is one interface's packets.
type Source struct {
	// Name and LinkType describe the interface in the pcapng file.
	Name     string
	LinkType layers.LinkType
	// Start begins handing packets to emit until the returned stop is
	// called; emit copies what it keeps and never blocks. out: the packet
	// goes toward the pod (pod side) or leaves the node (wire side).
	Start func(emit func(pkt []byte, out bool)) (stop func(), err error)
	// Keep, if set, selects the packets of this source worth writing
	// (after the port filter). It runs on the data path.
	Keep func(pkt []byte) bool
}

// Stats is what a capture saw.
type Stats struct {
	Packets, Bytes, Dropped uint64
	Reason                  string // why it ended: duration, count, size, client, stalled (the reader stopped reading), cancelled, error
}

type packet struct {
	intf int
	out  bool
	ts   time.Time
	data []byte
	orig int
}

// Run writes the packets of srcs that match r to w as pcapng until the
// capture ends. flush, if set, is called after each batch (an HTTP
// response's Flush).
func Run(ctx context.Context, w io.Writer, flush func(), r Request, srcs []Source) (Stats, error) {
	if err := r.Normalize(); err != nil {
		return Stats{}, err
	}
	if len(srcs) == 0 {
		return Stats{}, errors.New("capture: no packet source")
	}
	// Sources first: one that cannot start fails the capture before a byte
	// of pcapng is written (the caller can still answer with an error).
	q := make(chan packet, queueLen)
	var dropped atomic.Uint64
	var queued atomic.Int64 // bytes in q
	var closed atomic.Bool
	var qmu sync.RWMutex // held (read) while emitting, (write) to stop emitting
	var stops []func()
	defer func() {
		for _, stop := range stops {
			stop()
		}
		qmu.Lock()
		closed.Store(true)
		qmu.Unlock()
	}()
	for i, s := range srcs {
		intf, keep := i, s.Keep
		stop, err := s.Start(func(pkt []byte, out bool) {
			if r.Port != 0 && !hasPort(pkt, s.LinkType, r.Port) {
				return
			}
			if keep != nil && !keep(pkt) {
				return
			}
			qmu.RLock()
			defer qmu.RUnlock()
			if closed.Load() {
				return
			}
			n := min(len(pkt), Snaplen)
			if queued.Add(int64(n)) > queueBytes {
				queued.Add(-int64(n))
				dropped.Add(1)
				return
			}
			p := packet{intf: intf, out: out, ts: time.Now(), data: append([]byte(nil), pkt[:n]...), orig: len(pkt)}
			select {
			case q <- p:
			default:
				queued.Add(-int64(n))
				dropped.Add(1)
			}
		})
		if err != nil {
			return Stats{}, fmt.Errorf("capture on %s: %w", s.Name, err)
		}
		stops = append(stops, stop)
	}

	grace := cmp.Or(r.Grace, WriteGrace)
	hardEnd := time.Now().Add(r.Duration + grace)
	// deadline gives the next batch of writes at most grace, and the
	// capture as a whole at most its duration plus grace.
	deadline := func() {
		if r.WriteDeadline != nil {
			d := time.Now().Add(grace)
			if d.After(hardEnd) {
				d = hardEnd
			}
			_ = r.WriteDeadline(d)
		}
	}
	// ended is the reason for a failed write.
	ended := func(err error) string {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return "stalled"
		}
		return "client"
	}
	deadline()
	ifs := make([]pcapgo.NgInterface, len(srcs))
	for i, s := range srcs {
		ifs[i] = pcapgo.NgInterface{Name: s.Name, LinkType: s.LinkType, SnapLength: Snaplen, OS: "linux", TimestampResolution: 9}
	}
	ng, err := pcapgo.NewNgWriterInterface(w, ifs[0], pcapgo.NgWriterOptions{SectionInfo: pcapgo.NgSectionInfo{Application: "tunmesh-node", Comment: "tunmesh capture, side " + string(r.Side)}})
	if err != nil {
		return Stats{}, fmt.Errorf("pcapng header: %w", err)
	}
	for _, intf := range ifs[1:] {
		if _, err := ng.AddInterface(intf); err != nil {
			return Stats{}, fmt.Errorf("pcapng interface %s: %w", intf.Name, err)
		}
	}
	if err := ng.Flush(); err != nil {
		return Stats{Reason: ended(err)}, fmt.Errorf("write pcapng header: %w", err)
	}
	if flush != nil {
		flush()
	}

	st := Stats{}
	timer := time.NewTimer(r.Duration)
	defer timer.Stop()
	write := func(p packet) error {
		queued.Add(-int64(len(p.data)))
		dir := pcapgo.NgEpbFlagDirectionInbound
		if p.out {
			dir = pcapgo.NgEpbFlagDirectionOutbound
		}
		ci := gopacket.CaptureInfo{Timestamp: p.ts, CaptureLength: len(p.data), Length: p.orig, InterfaceIndex: p.intf}
		if err := ng.WritePacketWithOptions(ci, p.data, pcapgo.NgPacketOptions{Flags: &pcapgo.NgEpbFlags{Direction: dir}}); err != nil {
			return err
		}
		st.Packets++
		st.Bytes += uint64(len(p.data))
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			st.Reason = "cancelled"
		case <-timer.C:
			st.Reason = "duration"
		case p := <-q:
			deadline()
			// Write what is queued, then flush once; the caps are checked
			// after every packet, so -c N writes exactly N.
			for more := true; more; {
				if err := write(p); err != nil {
					st.Reason, st.Dropped = ended(err), dropped.Load()
					return st, nil // the reader went away: an ordinary end
				}
				if r.MaxPackets > 0 && st.Packets >= uint64(r.MaxPackets) {
					st.Reason = "count"
					break
				} else if int64(st.Bytes) >= r.MaxBytes {
					st.Reason = "size"
					break
				}
				select {
				case p = <-q:
				default:
					more = false
				}
			}
			if err := ng.Flush(); err != nil {
				st.Reason, st.Dropped = ended(err), dropped.Load()
				return st, nil
			}
			if flush != nil {
				flush()
			}
		}
		if st.Reason != "" {
			break
		}
	}
	st.Dropped = dropped.Load()
	deadline()
	// The interface statistics block records the drops for the reader.
	for i := range srcs {
		_ = ng.WriteInterfaceStats(i, pcapgo.NgInterfaceStatistics{LastUpdate: time.Now(), PacketsDropped: st.Dropped, PacketsReceived: st.Packets})
	}
	_ = ng.Flush()
	if flush != nil {
		flush()
	}
	return st, nil
}

// ipOffset is where the IP header starts for a link type (-1: unknown).
func ipOffset(pkt []byte, lt layers.LinkType) int {
	switch lt {
	case layers.LinkTypeRaw:
		return 0
	case layers.LinkTypeEthernet:
		if len(pkt) < 14 {
			return -1
		}
		et := uint16(pkt[12])<<8 | uint16(pkt[13])
		if et != 0x0800 && et != 0x86dd {
			return -1
		}
		return 14
	}
	return -1
}

// Ports returns the protocol, addresses and ports of an unfragmented
// IPv4/IPv6 TCP or UDP packet (ok false otherwise).
func Ports(pkt []byte, lt layers.LinkType) (proto uint8, src, dst netip.AddrPort, ok bool) {
	off := ipOffset(pkt, lt)
	if off < 0 || len(pkt) < off+1 {
		return 0, src, dst, false
	}
	b := pkt[off:]
	var l4 []byte
	var sa, da netip.Addr
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return 0, src, dst, false
		}
		ihl := int(b[0]&0xf) * 4
		if ihl < 20 || len(b) < ihl+4 || (uint16(b[6])<<8|uint16(b[7]))&0x3fff != 0 {
			return 0, src, dst, false
		}
		proto = b[9]
		sa, da = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		l4 = b[ihl:]
	case 6:
		if len(b) < 44 {
			return 0, src, dst, false
		}
		proto = b[6] // extension headers are not followed
		sa, da = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		l4 = b[40:]
	default:
		return 0, src, dst, false
	}
	if proto != 6 && proto != 17 {
		return proto, src, dst, false
	}
	sp, dp := uint16(l4[0])<<8|uint16(l4[1]), uint16(l4[2])<<8|uint16(l4[3])
	return proto, netip.AddrPortFrom(sa, sp), netip.AddrPortFrom(da, dp), true
}

func hasPort(pkt []byte, lt layers.LinkType, port uint16) bool {
	_, s, d, ok := Ports(pkt, lt)
	return ok && (s.Port() == port || d.Port() == port)
}
