// Package flowlog is the agent's live connection accounting: every meshed
// connection (outbound and inbound) while it is open and for a while after,
// every connection the agent left in plaintext and why (an outbound flow it
// passed through, a plaintext peer or probe that reached a meshed pod), and
// the HTTP/1 exchanges seen in meshed streams. It feeds three consumers:
// `tunmeshctl edges` (Edges), `tunmeshctl tap` (Subscribe: a live event
// stream, bounded, dropping for slow readers) and the per-workload
// Prometheus series (metrics.go).
//
// Nothing here may hold up the data path: recording takes one short lock,
// events go to subscribers without blocking, and the HTTP parser is only
// attached to a connection when metrics or a tap want it.
package flowlog

import (
	"container/list"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// TLS values besides the reasons a connection is not meshed.
const (
	TLSTrue = "true"
	// NotProvidedByRemote: a plaintext connection reached a meshed pod
	// from outside the mesh (a kubelet probe, a peer not in the mesh).
	NotProvidedByRemote = "not_provided_by_remote"
)

// Proxy sides, as in the seed's tap lines.
const (
	Out = "out" // the connection's client is a local pod
	In  = "in"  // the connection's server is a local pod
)

// PodRef names a pod (empty Name: not a pod the agent knows).
type PodRef struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	// Workload is the pod's owner without the ReplicaSet hash (the
	// Deployment), or the pod's name when it has no owner.
	Workload string `json:"workload,omitempty"`
}

// Conn is one connection as the agent accounts it.
type Conn struct {
	ID       uint64         `json:"id"`
	Proxy    string         `json:"proxy"`
	Src      netip.AddrPort `json:"src"`
	Dst      netip.AddrPort `json:"dst"`
	SrcPod   PodRef         `json:"srcPod"`
	DstPod   PodRef         `json:"dstPod"`
	TLS      string         `json:"tls"`
	ClientID string         `json:"clientId,omitempty"`
	ServerID string         `json:"serverId,omitempty"`
	// Peer is the other node's agent of a meshed connection (the
	// tunnel's far end; this node's own address for a same-node pair).
	Peer netip.Addr `json:"peer,omitzero"`
	// Tunnel is the TCP connection between the agents that carries a
	// meshed connection's stream: this node's end, then the peer's (zero
	// when not known). capture --side wire keeps these 4-tuples.
	Tunnel [2]netip.AddrPort `json:"tunnel,omitzero"`
	Opened time.Time         `json:"opened"`
	Closed time.Time         `json:"closed,omitzero"`
	// ClientBytes went from the client to the server, ServerBytes back
	// (known for meshed connections only).
	ClientBytes int64  `json:"clientBytes,omitempty"`
	ServerBytes int64  `json:"serverBytes,omitempty"`
	End         string `json:"end,omitempty"`
	// Count is how many connections a record of Seen stands for (the
	// same endpoints and reason, the client's port aside), Opened the
	// last; 0 means one.
	Count int `json:"count,omitempty"`
}

// TunnelOf is the 4-tuple of the connection c is (or rides on: a mux
// stream reports its connection's addresses): local end, remote end.
func TunnelOf(c interface {
	LocalAddr() net.Addr
	RemoteAddr() net.Addr
}) [2]netip.AddrPort {
	return [2]netip.AddrPort{addrPort(c.LocalAddr()), addrPort(c.RemoteAddr())}
}

func addrPort(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	if a == nil {
		return netip.AddrPort{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// local is the pod on this agent's side of c.
func (c *Conn) local() PodRef {
	if c.Proxy == Out {
		return c.SrcPod
	}
	return c.DstPod
}

// Event is one line of tap.
type Event struct {
	Type string    `json:"type"` // open, close, req, rsp, end
	Time time.Time `json:"time"`
	Conn Conn      `json:"conn"`
	// HTTP: req, rsp, end.
	Method         string        `json:"method,omitempty"`
	Authority      string        `json:"authority,omitempty"`
	Path           string        `json:"path,omitempty"`
	Status         int           `json:"status,omitempty"`
	Latency        time.Duration `json:"latency,omitempty"`
	Duration       time.Duration `json:"duration,omitempty"`
	ResponseLength int64         `json:"responseLength,omitempty"`
}

// String renders the event in the seed's tap line shape.
func (e Event) String() string {
	c := e.Conn
	s := fmt.Sprintf("id=%d proxy=%s src=%s dst=%s tls=%s", c.ID, c.Proxy, c.Src, c.Dst, c.TLS)
	switch e.Type {
	case "open", "close":
		s = "tcp " + e.Type + " " + s
		if c.ClientID != "" {
			s += " client_id=" + c.ClientID
		}
		if c.ServerID != "" {
			s += " server_id=" + c.ServerID
		}
		if e.Type == "close" && c.TLS == TLSTrue {
			s += fmt.Sprintf(" duration=%s bytes_client=%d bytes_server=%d end=%s", c.Closed.Sub(c.Opened).Round(time.Microsecond), c.ClientBytes, c.ServerBytes, c.End)
		}
		return s
	case "req":
		return fmt.Sprintf("req %s :method=%s :authority=%s :path=%s", s, e.Method, e.Authority, e.Path)
	case "rsp":
		return fmt.Sprintf("rsp %s :status=%d latency=%dµs", s, e.Status, e.Latency.Microseconds())
	case "end":
		return fmt.Sprintf("end %s duration=%dµs response-length=%dB", s, e.Duration.Microseconds(), e.ResponseLength)
	}
	return e.Type + " " + s
}

// Names finds the pod behind an address (zero PodRef: none known).
type Names func(netip.Addr) PodRef

// Options tune a Log; zero values mean the defaults.
type Options struct {
	// Keep is how long closed and passed-through connections stay in
	// Edges. Default 5 minutes.
	Keep time.Duration
	// MaxRecent bounds the meshed connections kept after they closed,
	// and the kinds of connections left unmeshed (Seen, counted by
	// endpoints and reason). Default 4096 each (the oldest go first).
	MaxRecent int
	// HTTP attaches the HTTP/1 parser to every meshed connection (for
	// the HTTP metrics); without it, only while someone taps.
	HTTP bool
}

// Log is the accounting. Safe for concurrent use.
type Log struct {
	names   Names
	metrics *Metrics // nil: no metrics
	opts    Options
	now     func() time.Time
	nextID  atomic.Uint64
	nSubs   atomic.Int32

	mu     sync.Mutex // guards the fields below
	live   map[uint64]*Conn
	recent []Conn // ring of ended meshed connections
	head   int    // next slot of recent once full
	// seen aggregates the connections the agent did not mesh (Seen) by
	// endpoints and reason: kubelet probes every second would otherwise
	// push everything else out of recent.
	seen map[seenKey]*list.Element // of seenOrder
	// seenOrder holds the seen records (*seenEntry) oldest update first,
	// so that eviction takes the front: O(1) per new key.
	seenOrder *list.List

	// subs are the tap subscribers indexed by their exact Filter, so that
	// publish looks up the few filters an event can match instead of
	// walking every subscriber; under their own lock, not mu.
	subsMu sync.RWMutex
	subs   map[Filter]map[*Sub]struct{}
}

// New returns a Log. names and m may be nil.
func New(names Names, m *Metrics, opts Options) *Log {
	if opts.Keep == 0 {
		opts.Keep = 5 * time.Minute
	}
	if opts.MaxRecent == 0 {
		opts.MaxRecent = 4096
	}
	if names == nil {
		names = func(netip.Addr) PodRef { return PodRef{} }
	}
	return &Log{names: names, metrics: m, opts: opts, now: time.Now, live: map[uint64]*Conn{}, seen: map[seenKey]*list.Element{}, seenOrder: list.New(), subs: map[Filter]map[*Sub]struct{}{}}
}

// Track is an open connection's handle.
type Track struct {
	l    *Log
	c    *Conn // in l.live; its end fields are written under l.mu
	base Conn  // the record as opened, immutable: what HTTP events carry
	lbl  labelSet
	once sync.Once
	obs  *observed // the HTTP-parsing conn wrapper, if attached
}

// Open records a connection that the mesh carries (TLS true), filling in
// the pod names it can, and tells the subscribers.
func (l *Log) Open(c Conn) *Track {
	c.ID = l.nextID.Add(1)
	c.Opened = l.now()
	l.fillNames(&c)
	l.mu.Lock()
	cp := c
	l.live[c.ID] = &cp
	l.mu.Unlock()
	lbl := l.metrics.opened(&c)
	l.publish(Event{Type: "open", Time: c.Opened, Conn: c})
	return &Track{l: l, c: &cp, base: c, lbl: lbl}
}

// Conn returns a copy of the connection's record.
func (t *Track) Conn() Conn {
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	return *t.c
}

// Close records the connection's end once (later calls do nothing).
func (t *Track) Close(clientBytes, serverBytes int64, end string) {
	t.once.Do(func() {
		if t.obs != nil {
			t.obs.close()
		}
		l := t.l
		l.mu.Lock()
		t.c.Closed, t.c.ClientBytes, t.c.ServerBytes, t.c.End = l.now(), clientBytes, serverBytes, end
		c := *t.c
		delete(l.live, c.ID)
		l.keepLocked(c)
		l.mu.Unlock()
		l.metrics.closed(t.lbl, &c)
		l.publish(Event{Type: "close", Time: c.Closed, Conn: c})
	})
}

// Seen records a connection the agent did not mesh (tls is why): a
// passed-through outbound flow, or a plaintext inbound one. The agent does
// not see it end; it stays in Edges for Options.Keep.
func (l *Log) Seen(c Conn) {
	c.ID = l.nextID.Add(1)
	c.Opened = l.now()
	l.fillNames(&c)
	l.mu.Lock()
	l.seenLocked(c)
	l.mu.Unlock()
	l.metrics.opened(&c)
	l.publish(Event{Type: "open", Time: c.Opened, Conn: c})
}

// seenKey groups Seen records: the client's port changes with every
// connection, the rest names the edge.
type seenKey struct {
	proxy, tls string
	src        netip.Addr
	dst        netip.AddrPort
}

// seenEntry is a seen record and its key.
type seenEntry struct {
	key  seenKey
	conn Conn
}

// seenLocked counts c under its key, dropping the entries older than
// Keep (or, still full, the oldest) to stay within MaxRecent. The records
// are kept in the order of their last update: the front is the oldest.
func (l *Log) seenLocked(c Conn) {
	k := seenKey{proxy: c.Proxy, tls: c.TLS, src: c.Src.Addr(), dst: c.Dst}
	if el := l.seen[k]; el != nil {
		e := el.Value.(*seenEntry)
		count := max(1, e.conn.Count) + 1
		e.conn = c
		e.conn.Count = count
		l.seenOrder.MoveToBack(el)
		return
	}
	cut := c.Opened.Add(-l.opts.Keep)
	for front := l.seenOrder.Front(); front != nil; front = l.seenOrder.Front() {
		e := front.Value.(*seenEntry)
		if !e.conn.Opened.Before(cut) && l.seenOrder.Len() < l.opts.MaxRecent {
			break
		}
		delete(l.seen, e.key)
		l.seenOrder.Remove(front)
	}
	l.seen[k] = l.seenOrder.PushBack(&seenEntry{key: k, conn: c})
}

func (l *Log) fillNames(c *Conn) {
	if c.SrcPod.Name == "" {
		c.SrcPod = l.names(c.Src.Addr())
	}
	if c.DstPod.Name == "" {
		c.DstPod = l.names(c.Dst.Addr())
	}
}

func (l *Log) keepLocked(c Conn) {
	if len(l.recent) < l.opts.MaxRecent {
		l.recent = append(l.recent, c)
		return
	}
	l.recent[l.head] = c
	l.head = (l.head + 1) % len(l.recent)
}

// Conns returns the open connections and those ended or seen within Keep.
func (l *Log) Conns() []Conn {
	cut := l.now().Add(-l.opts.Keep)
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Conn, 0, len(l.live)+len(l.recent)+len(l.seen))
	for _, c := range l.live {
		out = append(out, *c)
	}
	for el := l.seenOrder.Back(); el != nil; el = el.Prev() {
		c := &el.Value.(*seenEntry).conn
		if !c.Opened.After(cut) {
			break // the rest are older
		}
		out = append(out, *c)
	}
	for _, c := range l.recent {
		last := c.Closed
		if last.IsZero() {
			last = c.Opened
		}
		if last.After(cut) {
			out = append(out, c)
		}
	}
	return out
}

// Filter selects a subscriber's events: connections whose local pod is in
// Namespace (empty: any) and, if Name is set, is that pod.
type Filter struct {
	Namespace, Name string
}

func (f Filter) match(c *Conn) bool {
	for _, p := range []PodRef{c.SrcPod, c.DstPod} {
		if (f.Namespace == "" || p.Namespace == f.Namespace) && (f.Name == "" || p.Name == f.Name) && (p.Name != "" || f.Name == "" && f.Namespace == "") {
			return true
		}
	}
	return false
}

// Sub is a tap subscriber.
type Sub struct {
	l       *Log
	f       Filter
	c       chan Event
	dropped atomic.Uint64
	once    sync.Once
}

// Subscribe returns a subscriber receiving up to buf events ahead of its
// reader; beyond that, events are dropped and counted.
func (l *Log) Subscribe(f Filter, buf int) *Sub {
	s := &Sub{l: l, f: f, c: make(chan Event, buf)}
	l.subsMu.Lock()
	set := l.subs[f]
	if set == nil {
		set = map[*Sub]struct{}{}
		l.subs[f] = set
	}
	set[s] = struct{}{}
	l.subsMu.Unlock()
	l.nSubs.Add(1)
	return s
}

// C delivers the events.
func (s *Sub) C() <-chan Event { return s.c }

// Dropped counts events lost because the reader was slow.
func (s *Sub) Dropped() uint64 { return s.dropped.Load() }

// Close ends the subscription (idempotent). C is not closed.
func (s *Sub) Close() {
	s.once.Do(func() {
		s.l.subsMu.Lock()
		if set := s.l.subs[s.f]; set != nil {
			delete(set, s)
			if len(set) == 0 {
				delete(s.l.subs, s.f)
			}
		}
		s.l.subsMu.Unlock()
		s.l.nSubs.Add(-1)
	})
}

// tapping reports whether anyone subscribes.
func (l *Log) tapping() bool { return l.nSubs.Load() > 0 }

func (l *Log) publish(e Event) {
	if !l.tapping() {
		return
	}
	// The filters that match e (Filter.match): everything, and per end
	// that is a known pod its namespace, the pod, and the pod's name in
	// any namespace. A subscriber sits under exactly one filter, so
	// distinct filters reach each subscriber at most once.
	var keys [7]Filter
	n := 0
	add := func(f Filter) {
		for _, k := range keys[:n] {
			if k == f {
				return
			}
		}
		keys[n] = f
		n++
	}
	add(Filter{})
	for _, p := range [2]PodRef{e.Conn.SrcPod, e.Conn.DstPod} {
		if p.Name == "" {
			continue
		}
		add(Filter{Namespace: p.Namespace})
		add(Filter{Namespace: p.Namespace, Name: p.Name})
		add(Filter{Name: p.Name})
	}
	l.subsMu.RLock()
	defer l.subsMu.RUnlock()
	for _, k := range keys[:n] {
		for s := range l.subs[k] {
			select {
			case s.c <- e:
			default:
				s.dropped.Add(1)
			}
		}
	}
}
