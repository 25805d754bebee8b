package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack/internal/nstest"
)

// segHandler is a testHandler that also decides stray segments.
type segHandler struct {
	testHandler
	segment func(Flow) Decision
}

func (h *segHandler) HandleSegment(f Flow) Decision { return h.segment(f) }

// TestRefusedFlowsNeverReachHost: a flow decided Reset is refused at once
// (the pod's connect fails with ECONNREFUSED), one decided Drop is held
// (the connect times out, the handler is asked again on retransmission),
// and not one packet of either reaches the host.
func TestRefusedFlowsNeverReachHost(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	h := &testHandler{decide: func(f Flow) Decision {
		switch f.Dst.Port() {
		case 9001:
			return Reset
		case 9002:
			return Drop
		}
		return Passthrough
	}}
	s := newStack(t, Options{Handler: h, Passthrough: rec})
	p := newPod(t, s, 11, 65520)

	p.ns.Do(t, func() error {
		_, err := net.DialTimeout("tcp", "10.201.0.9:9001", 3*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("dial a Reset flow: err %v, want ECONNREFUSED", err)
		}
		_, err = net.DialTimeout("tcp", "10.201.0.9:9002", 1500*time.Millisecond)
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return fmt.Errorf("dial a Drop flow: err %v, want a timeout", err)
		}
		return nil
	})
	for _, pkt := range rec.all() {
		if info, err := parseIP(pkt); err == nil && info.tcp && (info.dport == 9001 || info.dport == 9002) {
			t.Fatalf("a packet of a refused flow reached the host: %+v", info)
		}
	}
	var asked9002 int
	for _, f := range h.seen() {
		if f.Dst.Port() == 9002 {
			asked9002++
		}
	}
	if asked9002 < 2 {
		t.Errorf("a dropped SYN's retransmission was decided %d times, want it asked again", asked9002)
	}
	st, _ := s.NICStats(p.nic)
	if st.RefusedFlows < 2 || st.TrackedFlows != 0 {
		t.Errorf("stats %+v: want >= 2 refused flows and none tracked", st)
	}
}

// TestStraySegmentsDecided: a non-SYN segment of a flow the stack neither
// owns nor remembers (a retransmission after an agent restart) is asked
// about; refused it is dropped and counted, allowed it passes and its flow
// is remembered so the next segment is not asked about again.
func TestStraySegmentsDecided(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	rec := &recorder{}
	var (
		mu    sync.Mutex
		asked []Flow
	)
	h := &segHandler{segment: func(f Flow) Decision {
		mu.Lock()
		asked = append(asked, f)
		mu.Unlock()
		if f.Dst.Port() == 9003 {
			return Drop
		}
		return Passthrough
	}}
	s := newStack(t, Options{Handler: h, Passthrough: rec})
	p := newPod(t, s, 12, 65520)

	claimed := testPacket{src: netip.AddrPortFrom(p.addr4, 40100), dst: netip.MustParseAddrPort("10.201.0.9:9003"),
		flags: tcpFlagACK | 0x08, seq: 1000, ack: 2000, payload: []byte("meshed bytes, never in clear")}
	free := claimed
	free.dst = netip.MustParseAddrPort("10.201.0.9:9004")
	free.payload = []byte("not claimed")

	p.ns.Inject(t, "tm0", claimed.bytes())
	p.ns.Inject(t, "tm0", free.bytes())
	rec.wait(t, "allowed stray segment", func(info packetInfo, _ []byte) bool { return info.tcp && info.dport == 9004 })
	p.ns.Inject(t, "tm0", free.bytes()) // remembered now: not asked again
	nstest.WaitFor(t, 2*time.Second, func() error {
		var n int
		for _, pkt := range rec.all() {
			if info, err := parseIP(pkt); err == nil && info.tcp && info.dport == 9004 {
				n++
			}
		}
		if n != 2 {
			return fmt.Errorf("%d segments of the allowed flow passed, want 2", n)
		}
		return nil
	})
	for _, pkt := range rec.all() {
		if info, err := parseIP(pkt); err == nil && info.tcp && info.dport == 9003 {
			t.Fatal("a segment of a claimed flow reached the host in clear")
		}
	}
	st, _ := s.NICStats(p.nic)
	if st.FailClosedDrops != 1 {
		t.Errorf("FailClosedDrops = %d, want 1", st.FailClosedDrops)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(asked) != 2 {
		t.Errorf("segment decider asked %d times (%v), want 2", len(asked), asked)
	}
}

// TestTerminatedTupleReusable (item 10): when the stack closes a
// terminated flow first, the pod's kernel keeps no TIME_WAIT and may reuse
// its source port for the same destination at once; the stack's TIME_WAIT
// of that tuple must not swallow the new SYN (gVisor reuses a TIME_WAIT
// tuple only for a listener, not a forwarder: this reconnect hung until
// TIME_WAIT ended). The TIME_WAIT here is TCP's 60 s, so only the reuse
// can make the reconnect immediate.
func TestTerminatedTupleReusable(t *testing.T) {
	nstest.SkipUnlessRoot(t)
	h := &testHandler{
		decide: func(Flow) Decision { return Terminate },
		serve: func(_ context.Context, c net.Conn, _ Flow) {
			_, _ = c.Write([]byte("bye")) // and the stack closes first
		},
	}
	s := newStack(t, Options{Handler: h, Passthrough: &recorder{}, TimeWait: 60 * time.Second})
	p := newPod(t, s, 13, 65520)
	local := netip.AddrPortFrom(p.addr4, 41000)
	dst := netip.MustParseAddrPort("10.201.0.9:9100")
	connect := func() time.Duration {
		var took time.Duration
		p.ns.Do(t, func() error {
			start := time.Now()
			d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local), Timeout: 5 * time.Second}
			c, err := d.Dial("tcp", dst.String())
			if err != nil {
				return fmt.Errorf("dial from %s: %w", local, err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			b, err := io.ReadAll(c)
			if err != nil || string(b) != "bye" {
				return fmt.Errorf("read %q, %v", b, err)
			}
			took = time.Since(start)
			return nil
		})
		return took
	}
	connect()
	time.Sleep(100 * time.Millisecond) // the pod's close reached the stack: TIME_WAIT
	for i := range 3 {
		if took := connect(); took > 500*time.Millisecond {
			t.Fatalf("reconnect %d from the same port took %v: the stack's TIME_WAIT swallowed the SYN", i, took)
		}
		time.Sleep(100 * time.Millisecond)
	}
	st, _ := s.NICStats(p.nic)
	if st.TimeWaitReused != 3 || st.TerminatedFlows != 4 {
		t.Fatalf("stats %+v: want 3 TIME_WAIT tuples reused, 4 flows", st)
	}
}
