package outbound

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack"
)

func flow(port uint16) netstack.Flow {
	return netstack.Flow{NIC: 1, Src: netip.AddrPortFrom(netip.MustParseAddr("10.244.1.2"), port), Dst: netip.MustParseAddrPort("10.244.2.3:80")}
}

// TestPendingFlowsSweep: decisions whose handshake never completed do not
// accumulate; fresh ones survive a sweep and are handed over once.
func TestPendingFlowsSweep(t *testing.T) {
	p := pendingFlows{m: map[netstack.Flow]*pendingTarget{}}
	for i := 0; i < pendingSweepAt; i++ {
		p.put(flow(uint16(1000+i)), Target{})
	}
	for _, v := range p.m {
		v.decided = time.Now().Add(-2 * pendingTTL) // their handshakes never completed
	}
	fresh := flow(50000)
	p.put(fresh, Target{})
	if len(p.m) != 1 {
		t.Fatalf("%d pending entries after a sweep, want 1", len(p.m))
	}
	if _, ok := p.take(fresh); !ok {
		t.Fatal("a fresh decision must be handed over")
	}
	if _, ok := p.take(fresh); ok {
		t.Fatal("a decision must be handed over only once")
	}
}
