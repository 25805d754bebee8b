package netstack

import (
	"bytes"
	"net/netip"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tunmesh/tunmesh/netstack/tun"
)

// toGVisor records what the classifier lets into gVisor.
type toGVisor struct {
	mu   sync.Mutex
	pkts [][]byte
}

func (d *toGVisor) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if pkt.GSOOptions != (stack.GSO{}) {
		panic("offload state reached gVisor")
	}
	d.mu.Lock()
	d.pkts = append(d.pkts, packetBytes(pkt, nil))
	d.mu.Unlock()
}

func (*toGVisor) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// offloadRecorder is a recorder that also takes offloads, like the host TUN
// in tun.ModeOffload.
type offloadRecorder struct {
	recorder
	hdrs []tun.VnetHdr
}

func (r *offloadRecorder) WriteOffload(b []byte, h tun.VnetHdr) error {
	r.mu.Lock()
	r.hdrs = append(r.hdrs, h)
	r.mu.Unlock()
	return r.WritePacket(b)
}

// classifier is one pod NIC's classifying link endpoint without a TUN or
// root: packets are fed as the TUN reader would feed them; what goes into
// gVisor, and what to the host, is recorded. No gVisor endpoint exists on
// it, so nothing is owned.
type classifier struct {
	e   *linkEndpoint
	n   *nic
	in  *toGVisor
	out PacketWriter
}

func newClassifier(t *testing.T, out PacketWriter, h FlowHandler) *classifier {
	t.Helper()
	if h == nil {
		h = &testHandler{}
	}
	s := newStack(t, Options{Handler: h, Passthrough: out, UnderlayMTU: 1500})
	n := &nic{id: 1, name: "test/classify", addrs: []netip.Addr{pod4.Addr(), pod6.Addr()}, s: s, flows: newFlowTable()}
	e := newLinkEndpoint(nil, n)
	e.Endpoint.Init(channel.New(1, 65520, ""), e)
	in := &toGVisor{}
	e.Endpoint.Attach(in)
	return &classifier{e: e, n: n, in: in, out: out}
}

// feed hands b, with offload header h, to the classifier as the TUN reader
// does.
func (c *classifier) feed(b []byte, h tun.VnetHdr) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	defer pkt.DecRef()
	pkt.GSOOptions = vnetToGSO(h)
	proto := tcpip.NetworkProtocolNumber(0x0800)
	if b[0]>>4 == 6 {
		proto = 0x86dd
	}
	c.e.DeliverNetworkPacket(proto, pkt)
}

// TestSuperPacketDecidedAsItsSegments: a TSO super-packet from a pod meets
// every fail-closed decision exactly as the segments it stands for would:
// the same drops and counters, and byte for byte the same packets to the
// host.
func TestSuperPacketDecidedAsItsSegments(t *testing.T) {
	payload := make([]byte, 2500)
	for i := range payload {
		payload[i] = byte(i)
	}
	stray4 := testPacket{src: pod4, dst: dst4, flags: tcpFlagACK | tcpFlagPSH, seq: 10, ack: 20, id: 7, payload: payload}
	stray6 := testPacket{src: pod6, dst: dst6, flags: tcpFlagACK | tcpFlagFIN, seq: 10, ack: 20, payload: payload}
	spoofed := stray4
	spoofed.src = netip.MustParseAddrPort("10.200.0.99:40000")
	allow := func(Flow) Decision { return Passthrough }
	refuse := func(Flow) Decision { return Drop }

	for _, tc := range []struct {
		name    string
		tp      testPacket
		segment func(Flow) Decision
		want    func(t *testing.T, st NICStats, host [][]byte)
	}{
		{"stray allowed v4", stray4, allow, func(t *testing.T, st NICStats, host [][]byte) {
			if len(host) != 3 || st.PassthroughPackets != 3 || st.TrackedFlows != 1 {
				t.Errorf("host got %d packets, stats %+v; want 3 segments and the flow remembered", len(host), st)
			}
		}},
		{"stray allowed v6 with FIN", stray6, allow, func(t *testing.T, st NICStats, host [][]byte) {
			if len(host) != 3 {
				t.Errorf("host got %d packets, want 3 segments", len(host))
			}
		}},
		{"stray refused", stray4, refuse, func(t *testing.T, st NICStats, host [][]byte) {
			if len(host) != 0 || st.FailClosedDrops == 0 {
				t.Errorf("host got %d packets, stats %+v; want none and fail-closed drops", len(host), st)
			}
		}},
		{"spoofed source", spoofed, allow, func(t *testing.T, st NICStats, host [][]byte) {
			if len(host) != 0 || st.SpoofedDrops == 0 {
				t.Errorf("host got %d packets, stats %+v; want none and spoofed drops", len(host), st)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			super, h := superPacket(tc.tp)
			superRec := &recorder{}
			sc := newClassifier(t, superRec, &segHandler{segment: tc.segment})
			sc.feed(super, h)

			// The same bytes as the pod's kernel would send them without
			// TSO, through a second NIC.
			segRec := &recorder{}
			pc := newClassifier(t, segRec, &segHandler{segment: tc.segment})
			info := infoOf(t, super)
			_, err := segmentTCP(append([]byte(nil), super...), &info, int(h.GSOSize), nil, func(seg []byte) error {
				pc.feed(append([]byte(nil), seg...), tun.VnetHdr{})
				return nil
			})
			must(t, err)

			superStats, segStats := sc.n.stats(), pc.n.stats()
			if superStats.SpoofedDrops > 0 != (segStats.SpoofedDrops > 0) ||
				superStats.FailClosedDrops > 0 != (segStats.FailClosedDrops > 0) ||
				superStats.PassthroughPackets != segStats.PassthroughPackets ||
				superStats.TrackedFlows != segStats.TrackedFlows || superStats.OtherDrops != 0 {
				t.Errorf("super-packet stats %+v\nsegment stats %+v", superStats, segStats)
			}
			host, segHost := superRec.all(), segRec.all()
			if len(host) != len(segHost) {
				t.Fatalf("host got %d packets for the super-packet, %d for its segments", len(host), len(segHost))
			}
			for i := range host {
				if !bytes.Equal(host[i], segHost[i]) {
					t.Errorf("packet %d differs:\n%x\n%x", i, host[i], segHost[i])
				}
				if !tcpChecksumOK(host[i], infoOf(t, host[i]).ipHdrLen) {
					t.Errorf("packet %d has a bad TCP checksum", i)
				}
			}
			if len(sc.in.pkts) != 0 {
				t.Errorf("%d packets reached gVisor", len(sc.in.pkts))
			}
			tc.want(t, superStats, host)
		})
	}
}

// TestOffloadPacketsRefused: offload headers the pod's kernel never writes
// (a pod with CAP_NET_RAW can, through a packet socket on tm0) are dropped,
// reaching neither gVisor nor the host.
func TestOffloadPacketsRefused(t *testing.T) {
	payload := make([]byte, 3000)
	syn := testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, payload: payload}
	data := testPacket{src: pod4, dst: dst4, flags: tcpFlagACK, payload: payload}
	udp := testPacket{src: pod4, dst: dst4, proto: 17, payload: payload}
	for _, tc := range []struct {
		name string
		tp   testPacket
		edit func(*tun.VnetHdr)
	}{
		{"super-packet SYN", syn, func(*tun.VnetHdr) {}},
		{"udp segmentation", udp, func(h *tun.VnetHdr) { h.GSOType = tun.VnetGSOUDPL4; h.CsumOffset = 6 }},
		{"checksum outside the packet", data, func(h *tun.VnetHdr) { h.CsumStart = 4000 }},
		{"v6 kind on v4", data, func(h *tun.VnetHdr) { h.GSOType = tun.VnetGSOTCPv6 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, h := superPacket(tc.tp)
			tc.edit(&h)
			rec := &recorder{}
			c := newClassifier(t, rec, &segHandler{segment: func(Flow) Decision { return Passthrough }})
			c.feed(b, h)
			if st := c.n.stats(); st.OtherDrops != 1 || len(rec.all()) != 0 || len(c.in.pkts) != 0 {
				t.Errorf("stats %+v, %d to host, %d to gVisor; want one drop, nothing through", st, len(rec.all()), len(c.in.pkts))
			}
		})
	}
}

// TestPassthroughOffloadWriter: with a host writer that takes offloads, a
// super-packet and a partial checksum go to the host as they came, with
// their offload header; a SYN's checksum is completed (and its MSS clamped)
// here, because a partial sum cannot be updated incrementally.
func TestPassthroughOffloadWriter(t *testing.T) {
	rec := &offloadRecorder{}
	c := newClassifier(t, rec, &segHandler{segment: func(Flow) Decision { return Passthrough }})

	data := testPacket{src: pod6, dst: dst6, flags: tcpFlagACK, seq: 1, payload: make([]byte, 3000)}
	b, h := superPacket(data)
	c.feed(append([]byte(nil), b...), h)

	udp := testPacket{src: pod4, dst: dst4, proto: 17, payload: []byte("dns?")}
	ub := partial(udp.bytes(), 6)
	uh := tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 6}
	c.feed(append([]byte(nil), ub...), uh)

	// A SYN retransmission of a flow already passed through.
	syn := testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, seq: 5, opts: mssOpt(65480)}
	k := flowKey{src: pod4, dst: dst4}
	c.n.flows.syn(k, c.n.s.now(), func() []byte { return nil })
	c.n.flows.promote(k, c.n.s.now())
	c.feed(partial(syn.bytes(), 16), tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 16})

	out := rec.all()
	if len(out) != 3 || len(rec.hdrs) != 2 {
		t.Fatalf("host got %d packets (%d with offload headers), want 3 (2)", len(out), len(rec.hdrs))
	}
	wantH := h
	wantH.HdrLen = 60
	if !bytes.Equal(out[0], b) || rec.hdrs[0] != wantH {
		t.Errorf("super-packet passed as %+v, want unchanged with %+v", rec.hdrs[0], wantH)
	}
	if !bytes.Equal(out[1], ub) || rec.hdrs[1] != uh {
		t.Errorf("partial udp passed as %+v, want unchanged with %+v", rec.hdrs[1], uh)
	}
	wantSYN := syn
	wantSYN.opts = mssOpt(1460)
	if !bytes.Equal(out[2], wantSYN.bytes()) {
		t.Errorf("SYN passed as\n%x\nwant (complete checksum, clamped)\n%x", out[2], wantSYN.bytes())
	}
}

// TestPassthroughPartialChecksumPlainWriter: a plain host writer gets
// complete checksums.
func TestPassthroughPartialChecksumPlainWriter(t *testing.T) {
	rec := &recorder{}
	c := newClassifier(t, rec, nil)
	udp := testPacket{src: pod4, dst: dst4, proto: 17, payload: []byte("odd")}
	c.feed(partial(udp.bytes(), 6), tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 6})
	if out := rec.all(); len(out) != 1 || !bytes.Equal(out[0], udp.bytes()) {
		t.Fatalf("host got %x, want %x", out, udp.bytes())
	}
}

// TestPureSYNWithPartialChecksumKeptComplete: the SYN copy kept while the
// handler decides (written to the host on Passthrough) has its checksum
// completed.
func TestPureSYNWithPartialChecksumKeptComplete(t *testing.T) {
	c := newClassifier(t, &recorder{}, nil)
	syn := testPacket{src: pod4, dst: dst4, flags: tcpFlagSYN, seq: 9, opts: mssOpt(65480)}
	c.feed(partial(syn.bytes(), 16), tun.VnetHdr{Flags: tun.VnetFlagNeedsCsum, CsumStart: 20, CsumOffset: 16})
	if len(c.in.pkts) != 1 {
		t.Fatalf("%d packets to gVisor, want the SYN", len(c.in.pkts))
	}
	kept, _ := c.n.flows.promote(flowKey{src: pod4, dst: dst4}, c.n.s.now())
	if !bytes.Equal(kept, syn.bytes()) {
		t.Fatalf("kept SYN\n%x\nwant\n%x", kept, syn.bytes())
	}
}
