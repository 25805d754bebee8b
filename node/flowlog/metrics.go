package flowlog

import (
	"container/list"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the top-line series per workload (docs/observability.md):
//
//	tunmesh_tcp_open_total{direction, namespace, workload, tls}
//	tunmesh_tcp_close_total{direction, namespace, workload, tls}
//	tunmesh_tcp_open_connections{direction, namespace, workload, tls}
//	tunmesh_tcp_bytes_total{direction, namespace, workload, tls, way}  way: sent|received by the local pod
//	tunmesh_http_requests_total{direction, namespace, workload, classification}  success|failure (5xx)
//	tunmesh_http_response_latency_seconds{direction, namespace, workload}  request start to response head
//
// direction is outbound (the local pod is the client) or inbound; tls is
// "true" or why the connection was not meshed. Labels are bounded: at most
// MaxWorkloads (namespace, workload) pairs have series at once. A new
// workload past the bound takes the place of the one used longest ago
// that has no open connection (its series are deleted: Prometheus sees
// them end, and a counter reset if it comes back), so churning Jobs never
// push later workloads aside; only when every kept workload has open
// connections is a new one counted under namespace="_other",
// workload="_other".
type Metrics struct {
	open, closeT, bytes, requests *prometheus.CounterVec
	active                        *prometheus.GaugeVec
	latency                       *prometheus.HistogramVec

	mu        sync.Mutex // guards workloads and lru
	workloads map[[2]string]*list.Element
	lru       *list.List // of *workloadUse, least recently used first
	max       int
}

// workloadUse is a workload with series and its open meshed connections.
type workloadUse struct {
	key  [2]string
	open int
}

// DefaultMaxWorkloads bounds the workload label values per agent.
const DefaultMaxWorkloads = 1000

// Other is the label value of workloads past the bound.
const Other = "_other"

// NewMetrics registers the series in reg; maxWorkloads 0 means the default.
func NewMetrics(reg prometheus.Registerer, maxWorkloads int) (*Metrics, error) {
	if reg == nil {
		return nil, errors.New("flowlog metrics: nil registerer")
	}
	if maxWorkloads == 0 {
		maxWorkloads = DefaultMaxWorkloads
	}
	l := []string{"direction", "namespace", "workload", "tls"}
	m := &Metrics{
		open:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_tcp_open_total", Help: "TCP connections of local pods opened, by direction, workload and tls (true, or why not meshed)."}, l),
		closeT: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_tcp_close_total", Help: "Meshed TCP connections of local pods closed."}, l),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_tcp_bytes_total", Help: "Bytes of meshed connections, sent or received by the local pod."},
			append(l[:4:4], "way")),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tunmesh_tcp_open_connections", Help: "Meshed TCP connections of local pods open now."}, l),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tunmesh_http_requests_total", Help: "HTTP/1 responses seen in meshed connections, by classification (failure: status 5xx)."},
			[]string{"direction", "namespace", "workload", "classification"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tunmesh_http_response_latency_seconds", Help: "HTTP/1 response latency (request start to response head) in meshed connections.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}},
			[]string{"direction", "namespace", "workload"}),
		workloads: map[[2]string]*list.Element{},
		lru:       list.New(),
		max:       maxWorkloads,
	}
	for _, c := range []prometheus.Collector{m.open, m.closeT, m.bytes, m.active, m.requests, m.latency} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register flowlog metrics: %w", err)
		}
	}
	return m, nil
}

// labelSet is a connection's bounded labels, worked out once when it
// opens.
type labelSet struct{ direction, ns, wl, tls string }

// labels returns the bounded (namespace, workload) of c's local pod.
func (m *Metrics) labels(c *Conn) labelSet {
	direction := "outbound"
	if c.Proxy == In {
		direction = "inbound"
	}
	p := c.local()
	ns, wl := p.Namespace, p.Workload
	if wl == "" {
		wl = p.Name
	}
	k := [2]string{ns, wl}
	m.mu.Lock()
	defer m.mu.Unlock()
	el := m.workloads[k]
	if el == nil {
		if len(m.workloads) >= m.max && !m.evictLocked() {
			return labelSet{direction, Other, Other, c.TLS}
		}
		el = m.lru.PushBack(&workloadUse{key: k})
		m.workloads[k] = el
	}
	m.lru.MoveToBack(el)
	if c.TLS == TLSTrue {
		el.Value.(*workloadUse).open++
	}
	return labelSet{direction, ns, wl, c.TLS}
}

// evictLocked deletes the series of the least recently used workload
// without open connections; false when every one has some.
func (m *Metrics) evictLocked() bool {
	for el := m.lru.Front(); el != nil; el = el.Next() {
		w := el.Value.(*workloadUse)
		if w.open > 0 {
			continue
		}
		match := prometheus.Labels{"namespace": w.key[0], "workload": w.key[1]}
		m.open.DeletePartialMatch(match)
		m.closeT.DeletePartialMatch(match)
		m.bytes.DeletePartialMatch(match)
		m.active.DeletePartialMatch(match)
		m.requests.DeletePartialMatch(match)
		m.latency.DeletePartialMatch(match)
		m.lru.Remove(el)
		delete(m.workloads, w.key)
		return true
	}
	return false
}

// release: one of the workload's meshed connections ended.
func (m *Metrics) release(l labelSet) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l.tls != TLSTrue {
		return
	}
	if el := m.workloads[[2]string{l.ns, l.wl}]; el != nil {
		if w := el.Value.(*workloadUse); w.open > 0 {
			w.open--
		}
	}
}

func (m *Metrics) opened(c *Conn) labelSet {
	if m == nil {
		return labelSet{}
	}
	l := m.labels(c)
	m.open.WithLabelValues(l.direction, l.ns, l.wl, l.tls).Inc()
	if c.TLS == TLSTrue {
		m.active.WithLabelValues(l.direction, l.ns, l.wl, l.tls).Inc()
	}
	return l
}

func (m *Metrics) closed(l labelSet, c *Conn) {
	if m == nil {
		return
	}
	defer m.release(l)
	m.closeT.WithLabelValues(l.direction, l.ns, l.wl, l.tls).Inc()
	m.active.WithLabelValues(l.direction, l.ns, l.wl, l.tls).Dec()
	sent, recv := c.ClientBytes, c.ServerBytes
	if c.Proxy == In {
		sent, recv = recv, sent
	}
	m.bytes.WithLabelValues(l.direction, l.ns, l.wl, l.tls, "sent").Add(float64(sent))
	m.bytes.WithLabelValues(l.direction, l.ns, l.wl, l.tls, "received").Add(float64(recv))
}

func (m *Metrics) response(l labelSet, status int, latency time.Duration) {
	if m == nil {
		return
	}
	class := "success"
	if status >= 500 {
		class = "failure"
	}
	m.requests.WithLabelValues(l.direction, l.ns, l.wl, class).Inc()
	m.latency.WithLabelValues(l.direction, l.ns, l.wl).Observe(latency.Seconds())
}
