package flowlog

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var (
	clientAddr = netip.MustParseAddrPort("10.1.0.5:40000")
	serverAddr = netip.MustParseAddrPort("10.1.1.7:8080")
	probeAddr  = netip.MustParseAddrPort("10.1.1.1:51000")
)

func names(a netip.Addr) PodRef {
	switch a {
	case clientAddr.Addr():
		return PodRef{Namespace: "shop", Name: "client-abc", Workload: "client"}
	case serverAddr.Addr():
		return PodRef{Namespace: "shop", Name: "web-xyz", Workload: "web"}
	}
	return PodRef{}
}

func newLog(t *testing.T, opts Options) (*Log, *Metrics, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg, 0)
	if err != nil {
		t.Fatal(err)
	}
	return New(names, m, opts), m, reg
}

// TestEdgesAndTap: meshed, passed-through and plaintext inbound
// connections show as edges with their reason, the server's copy of a
// meshed connection is not counted twice, and a subscriber sees open and
// close lines in the seed's shape.
func TestEdgesAndTap(t *testing.T) {
	l, _, reg := newLog(t, Options{})
	sub := l.Subscribe(Filter{Namespace: "shop", Name: "web-xyz"}, 16)
	defer sub.Close()
	other := l.Subscribe(Filter{Namespace: "bank"}, 16)
	defer other.Close()

	out := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue, ClientID: "spiffe://c/ns/shop/sa/client", ServerID: "spiffe://c/ns/shop/sa/web"})
	in := l.Open(Conn{Proxy: In, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue, ClientID: "spiffe://c/ns/shop/sa/client", ServerID: "spiffe://c/ns/shop/sa/web"})
	l.Seen(Conn{Proxy: Out, Src: clientAddr, Dst: netip.MustParseAddrPort("10.1.1.7:9090"), TLS: "skipped_port"})
	l.Seen(Conn{Proxy: In, Src: probeAddr, Dst: serverAddr, TLS: NotProvidedByRemote})
	in.Close(10, 20, "clean")
	out.Close(10, 20, "clean")
	out.Close(0, 0, "twice") // no effect

	edges := l.Edges()
	if len(edges) != 3 {
		t.Fatalf("edges %+v, want 3", edges)
	}
	var got []string
	for _, e := range edges {
		got = append(got, fmt.Sprintf("%s/%s%s -> %s/%s%s tls=%s conns=%d", e.Src.Namespace, e.Src.Name, e.SrcAddr, e.Dst.Namespace, e.Dst.Name, e.DstAddr, e.TLS, e.Conns))
	}
	want := []string{
		"/10.1.1.1 -> shop/web-xyz tls=not_provided_by_remote conns=1",
		"shop/client-abc -> shop/web-xyz tls=skipped_port conns=1",
		"shop/client-abc -> shop/web-xyz tls=true conns=1",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("edges:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	var lines []string
	for len(sub.C()) > 0 {
		lines = append(lines, (<-sub.C()).String())
	}
	if len(lines) != 6 || !strings.HasPrefix(lines[0], "tcp open id=1 proxy=out src=10.1.0.5:40000 dst=10.1.1.7:8080 tls=true client_id=spiffe://c/ns/shop/sa/client server_id=spiffe://c/ns/shop/sa/web") ||
		!strings.Contains(lines[3], "tls=not_provided_by_remote") || !strings.HasPrefix(lines[5], "tcp close id=1") {
		t.Fatalf("tap lines:\n%s", strings.Join(lines, "\n"))
	}
	if len(other.C()) != 0 {
		t.Fatal("a subscriber of another namespace got events")
	}
	if v := value(t, reg, "tunmesh_tcp_open_total", "outbound", "shop", "client", "skipped_port"); v != 1 {
		t.Fatalf("skipped_port opens = %v", v)
	}
	if v := value(t, reg, "tunmesh_tcp_open_connections", "outbound", "shop", "client", "true"); v != 0 {
		t.Fatalf("open connections after close = %v", v)
	}
}

// value sums a gathered metric's series whose label values (in label
// name order) start with values; series counts them.
func value(t *testing.T, reg *prometheus.Registry, name string, values ...string) float64 {
	v, _ := gather(t, reg, name, values...)
	return v
}

// labelOrder names the label values that value and gather take.
var labelOrder = []string{"direction", "namespace", "workload", "tls"}

func gather(t *testing.T, reg *prometheus.Registry, name string, values ...string) (sum float64, series int) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i, v := range values {
				if have[labelOrder[i]] != v {
					continue next
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			series++
		}
	}
	return sum, series
}

// TestSlowSubscriberDrops: a reader that does not keep up loses events
// (counted); the recording never waits for it.
func TestSlowSubscriberDrops(t *testing.T) {
	l, _, _ := newLog(t, Options{})
	sub := l.Subscribe(Filter{}, 2)
	defer sub.Close()
	done := make(chan struct{})
	go func() {
		for i := 0; i < 100; i++ {
			l.Seen(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: "not_meshed"})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("recording blocked on a slow subscriber")
	}
	if len(sub.C()) != 2 || sub.Dropped() != 98 {
		t.Fatalf("queued %d dropped %d", len(sub.C()), sub.Dropped())
	}
	sub.Close()
	sub.Close()
	if l.tapping() {
		t.Fatal("still tapping after Close")
	}
}

// TestRecentBounded: old connections leave Edges after Keep, and at most
// MaxRecent kinds are kept; repeats of one kind (a probe every second)
// are counted, not kept one by one.
func TestRecentBounded(t *testing.T) {
	l, _, _ := newLog(t, Options{Keep: time.Minute, MaxRecent: 3})
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	for i := 0; i < 5; i++ {
		l.Seen(Conn{Proxy: Out, Src: clientAddr, Dst: netip.AddrPortFrom(serverAddr.Addr(), uint16(9000+i)), TLS: "not_meshed"})
	}
	if n := len(l.Conns()); n != 3 {
		t.Fatalf("%d kept, want 3", n)
	}
	for i := 0; i < 100; i++ {
		now = now.Add(time.Millisecond)
		l.Seen(Conn{Proxy: In, Src: netip.AddrPortFrom(probeAddr.Addr(), uint16(50000+i)), Dst: serverAddr, TLS: NotProvidedByRemote})
	}
	edges := l.Edges()
	var probes int
	for _, e := range edges {
		if e.TLS == NotProvidedByRemote {
			probes += e.Conns
		}
	}
	if probes != 100 || len(l.Conns()) != 3 {
		t.Fatalf("probes counted %d (want 100), %d kept (want 3): %+v", probes, len(l.Conns()), edges)
	}
	now = now.Add(2 * time.Minute)
	if n := len(l.Conns()); n != 0 {
		t.Fatalf("%d kept after Keep, want 0", n)
	}
}

// TestObserveHTTP: a wrapped pod connection reports req/rsp/end for the
// HTTP/1 exchange through it, counts it in the HTTP metrics, keeps the
// bytes exact, and is not wrapped at all when nothing wants HTTP.
func TestObserveHTTP(t *testing.T) {
	l, _, reg := newLog(t, Options{HTTP: true})
	sub := l.Subscribe(Filter{}, 16)
	defer sub.Close()
	tr := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	podSide, agentSide := net.Pipe()
	wrapped := tr.Observe(agentSide, true)
	if wrapped == agentSide {
		t.Fatal("not wrapped with HTTP metrics on")
	}
	req := "GET /hello HTTP/1.1\r\nHost: web.shop\r\n\r\n"
	rsp := "HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"
	go func() {
		_, _ = podSide.Write([]byte(req))
		b := make([]byte, len(rsp))
		_, _ = io.ReadFull(podSide, b)
		podSide.Close()
	}()
	b := make([]byte, len(req))
	if _, err := io.ReadFull(wrapped, b); err != nil || string(b) != req {
		t.Fatalf("read %q, %v", b, err)
	}
	if _, err := wrapped.Write([]byte(rsp)); err != nil {
		t.Fatal(err)
	}
	tr.Close(int64(len(req)), int64(len(rsp)), "clean")
	var types []string
	for len(sub.C()) > 0 {
		e := <-sub.C()
		types = append(types, e.Type)
		if e.Type == "req" && (e.Method != "GET" || e.Path != "/hello" || e.Authority != "web.shop") {
			t.Fatalf("req %+v", e)
		}
		if e.Type == "end" && e.ResponseLength != 4 {
			t.Fatalf("end %+v", e)
		}
	}
	if strings.Join(types, ",") != "open,req,rsp,end,close" {
		t.Fatalf("events %v", types)
	}
	if v := value(t, reg, "tunmesh_http_requests_total", "outbound", "shop", "client"); v != 1 {
		t.Fatalf("failures = %v", v)
	}

	quiet, _, _ := newLog(t, Options{})
	tr2 := quiet.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	if got := tr2.Observe(agentSide, true); got != agentSide {
		t.Fatal("wrapped although no metric or tap needs HTTP")
	}
}

type tryConn struct {
	net.Conn
	tried int
}

func (c *tryConn) TryWrite(b []byte) (int, error) { c.tried += len(b); return len(b), nil }

// TestObserveKeepsTryWrite: a connection with TryWrite keeps it wrapped.
func TestObserveKeepsTryWrite(t *testing.T) {
	l, _, _ := newLog(t, Options{HTTP: true})
	tr := l.Open(Conn{Proxy: In, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	a, _ := net.Pipe()
	tc := &tryConn{Conn: a}
	w := tr.Observe(tc, false)
	tw, ok := w.(tryWriter)
	if !ok {
		t.Fatal("TryWrite lost by the wrapper")
	}
	if n, _ := tw.TryWrite([]byte("GET / HTTP/1.1\r\n\r\n")); n != 18 || tc.tried != 18 {
		t.Fatalf("TryWrite passed %d", tc.tried)
	}
}

// TestLabelCardinalityBounded: churning workloads (Jobs) take the place
// of the workload used longest ago once their connections are closed:
// the series stay within MaxWorkloads, the newest workloads keep their
// own series, and nothing goes to _other while a place can be freed.
func TestLabelCardinalityBounded(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg, 5)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		pod := PodRef{Namespace: "jobs", Name: fmt.Sprintf("job-%d-xyz", i), Workload: fmt.Sprintf("job-%d", i)}
		l := New(func(netip.Addr) PodRef { return pod }, m, Options{})
		tr := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
		tr.Close(1, 1, "clean")
	}
	if _, n := gather(t, reg, "tunmesh_tcp_open_total"); n != 5 {
		t.Fatalf("%d series, want 5", n)
	}
	for _, name := range []string{"tunmesh_tcp_close_total", "tunmesh_tcp_open_connections"} {
		if _, n := gather(t, reg, name); n != 5 {
			t.Fatalf("%s: %d series, want 5 (evicted workloads' series deleted)", name, n)
		}
	}
	if v := value(t, reg, "tunmesh_tcp_open_total", "outbound", "jobs", "job-199", "true"); v != 1 {
		t.Fatalf("the newest workload's opens = %v, want its own series", v)
	}
	if v := value(t, reg, "tunmesh_tcp_open_total", "outbound", Other, Other, "true"); v != 0 {
		t.Fatalf("_other opens = %v, want none", v)
	}
}

// TestLabelEvictionKeepsOpenWorkloads: a workload with open connections
// keeps its series; when every kept workload has some, a new one is
// counted under _other.
func TestLabelEvictionKeepsOpenWorkloads(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg, 2)
	if err != nil {
		t.Fatal(err)
	}
	open := func(wl string) *Track {
		pod := PodRef{Namespace: "shop", Name: wl + "-1", Workload: wl}
		return New(func(netip.Addr) PodRef { return pod }, m, Options{}).Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	}
	a := open("a") // stays open
	open("b").Close(1, 1, "clean")
	open("c").Close(1, 1, "clean") // b goes, not a
	if v := value(t, reg, "tunmesh_tcp_open_connections", "outbound", "shop", "a", "true"); v != 1 {
		t.Fatalf("a's open connections = %v after eviction, want 1", v)
	}
	c := open("c") // c again: kept, now open
	open("d").Close(1, 1, "clean")
	if v := value(t, reg, "tunmesh_tcp_open_total", "outbound", Other, Other, "true"); v != 1 {
		t.Fatalf("_other opens = %v, want 1 (a and c open)", v)
	}
	a.Close(1, 1, "clean")
	c.Close(1, 1, "clean")
	open("e").Close(1, 1, "clean")
	if v := value(t, reg, "tunmesh_tcp_open_total", "outbound", "shop", "e", "true"); v != 1 {
		t.Fatalf("e's opens = %v once a place is free", v)
	}
}

func TestWorkload(t *testing.T) {
	yes := true
	cases := []struct {
		pod  corev1.Pod
		want string
	}{
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-7d9f-abcde", Labels: map[string]string{"pod-template-hash": "7d9f"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7d9f", Controller: &yes}}}}, "web"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "db-0", OwnerReferences: []metav1.OwnerReference{{Kind: "StatefulSet", Name: "db", Controller: &yes}}}}, "db"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "bare"}}, "bare"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "backup-29138520-x7k2p", OwnerReferences: []metav1.OwnerReference{{Kind: "Job", Name: "backup-29138520", Controller: &yes}}}}, "backup"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "migrate-v2-abcde", OwnerReferences: []metav1.OwnerReference{{Kind: "Job", Name: "migrate-v2", Controller: &yes}}}}, "migrate-v2"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "run-42-abcde", OwnerReferences: []metav1.OwnerReference{{Kind: "Job", Name: "run-42", Controller: &yes}}}}, "run-42"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "x", OwnerReferences: []metav1.OwnerReference{{Kind: "Foo", Name: "notcontroller"}}}}, "x"},
	}
	for _, c := range cases {
		if got := Workload(&c.pod); got != c.want {
			t.Errorf("Workload(%s) = %q, want %q", c.pod.Name, got, c.want)
		}
	}
}

// readyConn is a pod connection read on demand (as netstack.Conn): its
// bytes come from TryRead, and NotifyReadable says when.
type readyConn struct {
	tryConn
	data     []byte
	notified int
}

func (c *readyConn) NotifyReadable(f func()) func() { c.notified++; f(); return func() {} }
func (c *readyConn) TryRead(b []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := copy(b, c.data)
	c.data = c.data[n:]
	return n, nil
}

// probedConn is a readyConn that tells whether TryRead has something.
type probedConn struct {
	readyConn
	ready bool
}

func (c *probedConn) ReadReady() bool { return c.ready }

// TestObserveForwardsReadReady: the wrapper answers ReadReady with the
// connection's answer (a splice then starts no copy for a direction with
// nothing to read), and with true for a connection that cannot tell (the
// splice then looks, as it always did).
func TestObserveForwardsReadReady(t *testing.T) {
	l, _, _ := newLog(t, Options{HTTP: true})
	type prober interface{ ReadReady() bool }
	for _, ready := range []bool{false, true} {
		a, _ := net.Pipe()
		pc := &probedConn{readyConn: readyConn{tryConn: tryConn{Conn: a}}, ready: ready}
		w := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue}).Observe(pc, true)
		p, ok := w.(prober)
		if !ok {
			t.Fatal("ReadReady lost by the wrapper")
		}
		if got := p.ReadReady(); got != ready {
			t.Errorf("ReadReady through the wrapper = %v, want the connection's %v", got, ready)
		}
	}
	a, _ := net.Pipe()
	w := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue}).Observe(&readyConn{tryConn: tryConn{Conn: a}}, true)
	if p, ok := w.(prober); !ok || !p.ReadReady() {
		t.Error("a connection without ReadReady must read as ready through the wrapper (the splice looks)")
	}
}

// TestObserveKeepsReadiness: a connection read on demand stays so when
// wrapped (a splice then parks no goroutine in Read), and what TryRead
// returns is parsed as Read's bytes are.
func TestObserveKeepsReadiness(t *testing.T) {
	l, _, _ := newLog(t, Options{HTTP: true})
	sub := l.Subscribe(Filter{}, 16)
	defer sub.Close()
	tr := l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	a, _ := net.Pipe()
	req := "GET /ready HTTP/1.1\r\nHost: web.shop\r\n\r\n"
	rc := &readyConn{tryConn: tryConn{Conn: a}, data: []byte(req)}
	w := tr.Observe(rc, true)
	rd, ok := w.(readable)
	if !ok {
		t.Fatal("NotifyReadable/TryRead lost by the wrapper")
	}
	if _, ok := w.(tryWriter); !ok {
		t.Fatal("TryWrite lost by the wrapper")
	}
	called := false
	rd.NotifyReadable(func() { called = true })()
	if !called || rc.notified != 1 {
		t.Fatal("NotifyReadable not passed through")
	}
	var got []byte
	buf := make([]byte, 7)
	for {
		n, err := rd.TryRead(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	if string(got) != req {
		t.Fatalf("TryRead gave %q", got)
	}
	for len(sub.C()) > 0 {
		if e := <-sub.C(); e.Type == "req" {
			if e.Path != "/ready" {
				t.Fatalf("req %+v", e)
			}
			return
		}
	}
	t.Fatal("the request read with TryRead was not parsed")
}
