package wireguard

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the transport's series, registered on the agent's registry.
type metrics struct {
	dropped *prometheus.CounterVec // datagrams to the port dropped, by reason
	refused *prometheus.CounterVec // tunnel connections refused, by reason
	dials   *prometheus.CounterVec // tunnel dials, by route
}

func newMetrics(reg prometheus.Registerer, t *Transport) (*metrics, error) {
	m := &metrics{
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_wireguard_dropped_datagrams_total",
			Help: "UDP datagrams to the WireGuard port dropped: malformed (not a WireGuard message), invalid_handshake (a handshake or cookie message that failed its checks).",
		}, []string{"reason"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_wireguard_tunnels_refused_total",
			Help: "Mesh tunnel connections refused by the WireGuard transport: underlay_from_wireguard_node (a node that publishes a key dialled the node address), unknown_overlay_peer, refused_peer (a dial to a node whose WireGuard annotations are unusable).",
		}, []string{"reason"}),
		dials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_wireguard_tunnel_dials_total",
			Help: "Mesh tunnel connections dialled, by route: overlay (WireGuard) or underlay (the node publishes no key, or this node).",
		}, []string{"route"}),
	}
	for _, r := range []string{"malformed", "invalid_handshake"} {
		m.dropped.WithLabelValues(r)
	}
	for _, r := range []string{"underlay_from_wireguard_node", "unknown_overlay_peer", "refused_peer"} {
		m.refused.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.dropped, m.refused, m.dials, collector{t}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// collector reports the peer table and the TUN's counters.
type collector struct{ t *Transport }

var (
	descPeers   = prometheus.NewDesc("tunmesh_wireguard_peers", "Other nodes by state: configured (reached over WireGuard), refused (unusable annotations: not reached), underlay (no key published: reached on the node address).", []string{"state"}, nil)
	descOffload = prometheus.NewDesc("tunmesh_wireguard_tun_offload_segments_total", "TCP segments of the overlay stack's mesh tunnels handled by the TUN's offloads: gso_split (cut from the stack's large packets, beyond the first of each), gro_merged (decrypted, merged into a previous segment before the stack).", []string{"kind"}, nil)
	descPackets = prometheus.NewDesc("tunmesh_wireguard_tun_packets_total", "Packets through the in-process TUN: to_overlay, to_host (decrypted pod traffic handed to the node's kernel), from_host (pod traffic to encrypt), dropped (decrypted, for no one), queue_full (to encrypt, dropped), too_big (from the host, over the inner MTU with DF: answered with ICMP fragmentation needed).", []string{"path"}, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPeers
	ch <- descPackets
	ch <- descOffload
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	conf, refused, under := c.t.peers.Counts()
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(conf), "configured")
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(refused), "refused")
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(under), "underlay")
	s := c.t.tun.Stats()
	for _, v := range []struct {
		path string
		n    uint64
	}{{"to_overlay", s.ToOverlay}, {"to_host", s.ToHost}, {"from_host", s.FromHost}, {"dropped", s.Dropped}, {"queue_full", s.QueueFull}, {"too_big", s.TooBig}} {
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(v.n), v.path)
	}
	ch <- prometheus.MustNewConstMetric(descOffload, prometheus.CounterValue, float64(s.Split), "gso_split")
	ch <- prometheus.MustNewConstMetric(descOffload, prometheus.CounterValue, float64(s.Coalesced), "gro_merged")
}
