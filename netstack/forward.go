package netstack

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// forward is the TCP forwarder's handler. gVisor's forwarder calls it on a
// goroutine of its own for each new SYN (a pure SYN the NIC's link endpoint
// let in); retransmissions of a SYN whose request is still open are absorbed
// by the forwarder. It asks the FlowHandler and then either completes the
// handshake and serves the connection, or passes the flow through.
//
// Every path calls r.Complete exactly once, so the forwarder's in-flight
// slot is freed. The goroutine is the forwarder's, not ours: if it starts
// after Close began, it completes the request and returns without calling
// the handler.
func (s *Stack) forward(r *tcp.ForwarderRequest) {
	if !s.enter() {
		r.Complete(false)
		return
	}
	defer s.exit()

	id := r.ID()
	src := netip.AddrPortFrom(fromTCPIPAddr(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(fromTCPIPAddr(id.LocalAddress), id.LocalPort)
	// The link endpoint admits a SYN only from a source that is one of its
	// pod's addresses, and addresses are unique, so the source names the
	// NIC the SYN came in on.
	n := s.nicForSource(src.Addr())
	if n == nil {
		r.Complete(false) // the NIC was detached meanwhile
		return
	}
	f := Flow{NIC: n.id, Src: src, Dst: dst}
	k := flowKey{src: src, dst: dst}

	d := s.opts.Handler.HandleFlow(f)
	switch d {
	case Passthrough, Terminate:
	default:
		// Fail closed: nothing of the flow reaches the host. A Reset
		// answers the SYN with a RST; a Drop leaves the pod to
		// retransmit and be decided again.
		n.flows.forget(k)
		r.Complete(d == Reset)
		n.counters.refusedFlows.Add(1)
		return
	}
	if d == Passthrough {
		// Record the decision before releasing the request, so a SYN
		// retransmitted from now on goes straight to the host instead of
		// asking again.
		syn, remembered := n.flows.promote(k, s.now())
		if !remembered {
			n.counters.flowTableFull.Add(1)
		}
		r.Complete(false)
		n.counters.passthroughFlows.Add(1)
		if syn != nil {
			if info, err := parseIP(syn); err == nil {
				n.writePassthrough(syn, &info)
			}
		}
		return
	}

	n.flows.forget(k)
	var wq waiter.Queue
	ep, tcpipErr := r.CreateEndpoint(&wq) // blocks until the handshake ends
	if tcpipErr != nil {
		r.Complete(true)
		n.counters.handshakeFailures.Add(1)
		s.logger.Debug("terminated flow: handshake failed", "nic", f.NIC, "src", f.Src, "dst", f.Dst, "err", tcpipErr)
		return
	}
	r.Complete(false)
	n.counters.terminatedFlows.Add(1)
	s.opts.Handler.ServeConn(s.ctx, newConn(s, &wq, ep), f)
}
