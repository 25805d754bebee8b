package nodemetrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/netstack"
)

// StackCollector exports the netstack's per-pod counters (anti-spoofing
// drops, passthrough, flows) at scrape time. A pod's series end when it
// is detached.
type StackCollector struct {
	Stats func() []netstack.NICStats
}

var (
	descSpoofed     = prometheus.NewDesc("tunmesh_node_spoofed_packets_total", "Packets from a pod whose source was not the pod's address, dropped.", []string{"pod"}, nil)
	descDrops       = prometheus.NewDesc("tunmesh_node_dropped_packets_total", "Packets from a pod dropped for other reasons (malformed, unusable source).", []string{"pod"}, nil)
	descPassPackets = prometheus.NewDesc("tunmesh_node_passthrough_packets_total", "Packets from a pod passed to the node's network stack unchanged.", []string{"pod"}, nil)
	descMSS         = prometheus.NewDesc("tunmesh_node_mss_clamped_total", "Passthrough SYN/SYN-ACKs whose MSS was clamped to the underlay.", []string{"pod"}, nil)
	descTerminated  = prometheus.NewDesc("tunmesh_node_terminated_flows_total", "Flows from a pod terminated in the netstack (meshed).", []string{"pod"}, nil)
	descDialed      = prometheus.NewDesc("tunmesh_node_dialed_flows_total", "Inbound meshed flows dialled into a pod.", []string{"pod"}, nil)
)

func (c StackCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSpoofed, descDrops, descPassPackets, descMSS, descTerminated, descDialed} {
		ch <- d
	}
}

func (c StackCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.Stats() {
		for d, v := range map[*prometheus.Desc]uint64{
			descSpoofed: s.SpoofedDrops, descDrops: s.OtherDrops, descPassPackets: s.PassthroughPackets,
			descMSS: s.MSSClamped, descTerminated: s.TerminatedFlows, descDialed: s.DialedFlows,
		} {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), s.Name)
		}
	}
}
