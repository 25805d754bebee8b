package netstack

import (
	"net/netip"
	"sync"
)

// flowKey names a TCP flow as the pod sees it: src is the pod's end.
type flowKey struct {
	src, dst netip.AddrPort
}

// maxPendingSYNs bounds the SYN copies one NIC keeps while the handler
// decides. Past it a SYN still reaches the forwarder but is not kept; if the
// decision is passthrough that SYN is lost and the pod's retransmission,
// which then finds the flow in the table, goes straight to the host.
const maxPendingSYNs = 4096

// maxPassthroughFlows bounds the passthrough flows one NIC remembers (one
// pod must not grow the agent without bound by opening flows to unmeshed
// addresses). Past it a flow is not remembered: its later segments are
// judged again (SegmentDecider) instead of taking the fast path, which is
// slower but never wrong. Counted in NICStats.FlowTableFull.
const maxPassthroughFlows = 65536

// flowTable is one NIC's memory of TCP flows the stack does not own:
// flows whose first SYN the handler decided to pass through, and SYNs the
// forwarder is still deciding on. Flows the stack owns (terminated or
// dialed) are not here: gVisor's transport demuxer is the authority for
// those.
//
// Times are nanoseconds on the Stack's monotonic clock.
type flowTable struct {
	mu sync.Mutex
	// passthrough holds flows decided Passthrough; their SYN
	// retransmissions and later packets go to the host without asking the
	// handler again.
	passthrough map[flowKey]*ptFlow
	// pending holds the latest raw SYN of flows handed to the forwarder
	// and not yet decided, so a Passthrough decision can emit it.
	pending map[flowKey]*pendingSYN
	// limit overrides maxPassthroughFlows (tests).
	limit int
}

type ptFlow struct {
	lastSeen int64
	// closing is set once the pod sent FIN or RST; a pure SYN on the same
	// 4-tuple after that is a new connection and is decided afresh.
	closing bool
}

type pendingSYN struct {
	pkt []byte
	at  int64
}

func newFlowTable() *flowTable {
	return &flowTable{
		passthrough: make(map[flowKey]*ptFlow),
		pending:     make(map[flowKey]*pendingSYN),
	}
}

// syn handles a pure SYN of a flow the stack does not own. It returns true
// if the flow is a known passthrough flow (send the SYN to the host);
// otherwise it keeps a copy of the SYN (copied by copySYN only when needed)
// and returns false (deliver it to the forwarder).
func (ft *flowTable) syn(k flowKey, now int64, copySYN func() []byte) (passthrough bool) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if f, ok := ft.passthrough[k]; ok {
		if !f.closing {
			f.lastSeen = now
			return true
		}
		delete(ft.passthrough, k)
	}
	if p, ok := ft.pending[k]; ok {
		p.pkt, p.at = copySYN(), now
		return false
	}
	if len(ft.pending) < maxPendingSYNs {
		ft.pending[k] = &pendingSYN{pkt: copySYN(), at: now}
	}
	return false
}

// promote records k as a passthrough flow (unless the table is full:
// remembered is false) and returns the SYN kept for it, or nil.
func (ft *flowTable) promote(k flowKey, now int64) (syn []byte, remembered bool) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if _, ok := ft.passthrough[k]; ok || len(ft.passthrough) < ft.maxFlows() {
		ft.passthrough[k] = &ptFlow{lastSeen: now}
		remembered = true
	}
	p, ok := ft.pending[k]
	if !ok {
		return nil, remembered
	}
	delete(ft.pending, k)
	return p.pkt, remembered
}

func (ft *flowTable) maxFlows() int {
	if ft.limit > 0 {
		return ft.limit
	}
	return maxPassthroughFlows
}

// forget drops the pending SYN of k (the handler terminated the flow).
func (ft *flowTable) forget(k flowKey) {
	ft.mu.Lock()
	delete(ft.pending, k)
	ft.mu.Unlock()
}

// remove forgets the passthrough flow k (a SegmentDecider refused a new
// connection on its tuple): its later segments are judged again.
func (ft *flowTable) remove(k flowKey) {
	ft.mu.Lock()
	delete(ft.passthrough, k)
	ft.mu.Unlock()
}

// touch notes a non-SYN packet of a flow the stack does not own and
// reports whether the flow is a known passthrough flow.
func (ft *flowTable) touch(k flowKey, now int64, finOrRST bool) (known bool) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	f, ok := ft.passthrough[k]
	if ok {
		f.lastSeen = now
		if finOrRST {
			f.closing = true
		}
	}
	return ok
}

// expire removes passthrough flows idle for longer than idle and pending
// SYNs older than pendingTTL.
func (ft *flowTable) expire(now, idle, pendingTTL int64) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	for k, f := range ft.passthrough {
		if now-f.lastSeen > idle {
			delete(ft.passthrough, k)
		}
	}
	for k, p := range ft.pending {
		if now-p.at > pendingTTL {
			delete(ft.pending, k)
		}
	}
}

// sizes reports the number of passthrough flows and pending SYNs.
func (ft *flowTable) sizes() (passthrough, pending int) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	return len(ft.passthrough), len(ft.pending)
}
