package nodemetrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/netstack"
)

// StackCollector exports the netstack's per-pod counters and gauges
// (anti-spoofing and fail-closed drops, passthrough, flows, offloads,
// datagram decisions) at scrape time. A pod's series end when it is
// detached.
type StackCollector struct {
	Stats func() []netstack.NICStats
}

// stackMetric is one exported NICStats field.
type stackMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(*netstack.NICStats) float64
}

func counter(name, help string, v func(*netstack.NICStats) uint64) stackMetric {
	return stackMetric{
		desc:  prometheus.NewDesc(name, help, []string{"pod"}, nil),
		typ:   prometheus.CounterValue,
		value: func(s *netstack.NICStats) float64 { return float64(v(s)) },
	}
}

func gauge(name, help string, v func(*netstack.NICStats) int) stackMetric {
	return stackMetric{
		desc:  prometheus.NewDesc(name, help, []string{"pod"}, nil),
		typ:   prometheus.GaugeValue,
		value: func(s *netstack.NICStats) float64 { return float64(v(s)) },
	}
}

// stackMetrics lists every NICStats field; TestStackCollectorExportsEveryField
// keeps it complete.
var stackMetrics = []stackMetric{
	counter("tunmesh_node_spoofed_packets_total", "Packets from a pod whose source was not the pod's address, dropped.",
		func(s *netstack.NICStats) uint64 { return s.SpoofedDrops }),
	counter("tunmesh_node_dropped_packets_total", "Packets from a pod dropped for other reasons (malformed, unusable source).",
		func(s *netstack.NICStats) uint64 { return s.OtherDrops }),
	counter("tunmesh_node_passthrough_packets_total", "Packets from a pod passed to the node's network stack unchanged.",
		func(s *netstack.NICStats) uint64 { return s.PassthroughPackets }),
	counter("tunmesh_node_passthrough_bytes_total", "Bytes of packets from a pod passed to the node's network stack.",
		func(s *netstack.NICStats) uint64 { return s.PassthroughBytes }),
	counter("tunmesh_node_passthrough_errors_total", "Packets from a pod whose write to the node's network stack failed.",
		func(s *netstack.NICStats) uint64 { return s.PassthroughErrors }),
	counter("tunmesh_node_mss_clamped_total", "Passthrough SYN/SYN-ACKs whose MSS was clamped to the underlay.",
		func(s *netstack.NICStats) uint64 { return s.MSSClamped }),
	counter("tunmesh_node_pod_passthrough_flows_total", "New flows from a pod passed through (not meshed) by decision (tunmesh_node_passthrough_flows_total has them by reason).",
		func(s *netstack.NICStats) uint64 { return s.PassthroughFlows }),
	counter("tunmesh_node_terminated_flows_total", "Flows from a pod terminated in the netstack (meshed).",
		func(s *netstack.NICStats) uint64 { return s.TerminatedFlows }),
	counter("tunmesh_node_pod_handshake_failures_total", "Flows from a pod to be meshed whose TCP handshake with the netstack did not complete.",
		func(s *netstack.NICStats) uint64 { return s.HandshakeFailures }),
	counter("tunmesh_node_dialed_flows_total", "Inbound meshed flows dialled into a pod.",
		func(s *netstack.NICStats) uint64 { return s.DialedFlows }),
	counter("tunmesh_node_refused_flows_total", "New flows from a pod refused (dropped or reset) by decision.",
		func(s *netstack.NICStats) uint64 { return s.RefusedFlows }),
	counter("tunmesh_node_fail_closed_drops_total", "Stray TCP segments from a pod dropped because no decision let them pass (fail closed).",
		func(s *netstack.NICStats) uint64 { return s.FailClosedDrops }),
	counter("tunmesh_node_flow_table_full_total", "Passthrough flows not remembered because the pod's flow table was full.",
		func(s *netstack.NICStats) uint64 { return s.FlowTableFull }),
	counter("tunmesh_node_time_wait_reused_total", "New flows from a pod on a tuple the netstack still held in TIME_WAIT.",
		func(s *netstack.NICStats) uint64 { return s.TimeWaitReused }),
	counter("tunmesh_node_super_packets_total", "TCP super-packets (TSO) read from a pod, each counted once.",
		func(s *netstack.NICStats) uint64 { return s.SuperPackets }),
	counter("tunmesh_node_datagram_decisions_total", "Non-TCP flows from a pod judged by policy.",
		func(s *netstack.NICStats) uint64 { return s.DatagramDecisions }),
	counter("tunmesh_node_datagram_denied_packets_total", "Non-TCP packets from a pod dropped as denied by policy.",
		func(s *netstack.NICStats) uint64 { return s.DatagramDenied }),
	counter("tunmesh_node_datagram_table_full_total", "Non-TCP decisions not remembered because the table was full.",
		func(s *netstack.NICStats) uint64 { return s.DatagramTableFull }),
	gauge("tunmesh_node_datagram_flows", "Non-TCP flow decisions remembered for a pod.",
		func(s *netstack.NICStats) int { return s.DatagramFlows }),
	gauge("tunmesh_node_tracked_flows", "Passthrough flows remembered for a pod.",
		func(s *netstack.NICStats) int { return s.TrackedFlows }),
	gauge("tunmesh_node_pending_syns", "SYNs from a pod awaiting a decision.",
		func(s *netstack.NICStats) int { return s.PendingSYNs }),
}

func (c StackCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range stackMetrics {
		ch <- m.desc
	}
}

// Collect sends one series per pod and field. Two NICs with one name (a
// stale NIC beside its pod's new one) are added up: duplicate series would
// fail the whole scrape.
func (c StackCollector) Collect(ch chan<- prometheus.Metric) {
	stats := c.Stats()
	sums := make(map[string][]float64, len(stats))
	var names []string
	for i := range stats {
		s := &stats[i]
		v, seen := sums[s.Name]
		if !seen {
			v = make([]float64, len(stackMetrics))
			names = append(names, s.Name)
		}
		for j, m := range stackMetrics {
			v[j] += m.value(s)
		}
		sums[s.Name] = v
	}
	for _, name := range names {
		for j, m := range stackMetrics {
			ch <- prometheus.MustNewConstMetric(m.desc, m.typ, sums[name][j], name)
		}
	}
}
