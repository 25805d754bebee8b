package agent

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
	p := pendingFlows{m: map[netstack.Flow]*target{}}
	for i := 0; i < pendingSweepAt; i++ {
		p.put(flow(uint16(1000+i)), &target{})
	}
	for _, v := range p.m {
		v.decided = time.Now().Add(-2 * pendingTTL) // their handshakes never completed
	}
	fresh := flow(50000)
	p.put(fresh, &target{})
	if len(p.m) != 1 {
		t.Fatalf("%d pending entries after a sweep, want 1", len(p.m))
	}
	if p.take(fresh) == nil || p.take(fresh) != nil {
		t.Fatal("a fresh decision must be handed over exactly once")
	}
}
