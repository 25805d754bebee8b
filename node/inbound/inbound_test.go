package inbound

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/tunnel"
)

type fakeLocal map[netip.Addr]*pods.Pod

func (f fakeLocal) ByAddr(a netip.Addr) *pods.Pod { return f[a] }
func (f fakeLocal) Identities() []spiffe.ID {
	var ids []spiffe.ID
	for _, p := range f {
		ids = append(ids, p.ID)
	}
	return ids
}

type fakeCluster map[netip.Addr][]*corev1.Pod

func (f fakeCluster) PodsByAddr(a netip.Addr) ([]*corev1.Pod, error) { return f[a], nil }
func (f fakeCluster) Changed() <-chan struct{}                       { return nil } // never changes

// learningCluster is a view that learns pods while a check waits, as the
// informer does when the kubelet reports a pod's IP.
type learningCluster struct {
	mu      sync.Mutex // guards the fields below
	pods    map[netip.Addr][]*corev1.Pod
	changed chan struct{}
}

func (c *learningCluster) PodsByAddr(a netip.Addr) ([]*corev1.Pod, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pods[a], nil
}

func (c *learningCluster) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// learn sets the pods holding a and wakes the waiters.
func (c *learningCluster) learn(a netip.Addr, ps ...*corev1.Pod) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pods[a] = ps
	close(c.changed)
	c.changed = make(chan struct{})
}

type noCerts struct{}

func (noCerts) ServerConfig(spiffe.ID, func(spiffe.ID) error) *tls.Config { return &tls.Config{} }

type noDial struct{}

func (noDial) DialTCP(context.Context, netstack.NICID, netip.AddrPort, netip.AddrPort) (net.Conn, error) {
	return nil, errors.New("no dial in this test")
}

func id(ns, sa string) spiffe.ID {
	return spiffe.ID{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
}

func srcPod(name, sa, ip, node string, terminating bool) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: name},
		Spec:       corev1.PodSpec{ServiceAccountName: sa},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: node, HostIPs: []corev1.HostIP{{IP: node}}},
	}
	if terminating {
		now := metav1.Now()
		p.DeletionTimestamp = &now
	}
	return p
}

var (
	nodeA   = netip.MustParseAddr("192.168.0.2")
	nodeB   = netip.MustParseAddr("192.168.0.3")
	srcIP   = netip.MustParseAddr("10.244.1.2")
	reuseIP = netip.MustParseAddr("10.244.1.3")
	twinIP  = netip.MustParseAddr("10.244.1.4")
	dstIP   = netip.MustParseAddr("10.244.2.3")
)

func newAcceptor(t *testing.T) *Acceptor {
	t.Helper()
	dst := &pods.Pod{Namespace: "prod", Name: "server", Addrs: []netip.Addr{dstIP}, NIC: 3, ID: id("prod", "server")}
	cluster := fakeCluster{
		srcIP: {srcPod("client", "default", srcIP.String(), nodeA.String(), false)},
		// IP reuse: the old holder terminates, a new pod of another
		// identity has the IP now.
		reuseIP: {srcPod("old", "default", reuseIP.String(), nodeA.String(), true), srcPod("new", "batch", reuseIP.String(), nodeA.String(), false)},
		// Two live pods claim one IP: trust neither.
		twinIP: {srcPod("a", "default", twinIP.String(), nodeA.String(), false), srcPod("b", "default", twinIP.String(), nodeA.String(), false)},
	}
	a, err := New(Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh"}, fakeLocal{dstIP: dst}, cluster, noCerts{}, noDial{}, nodemetrics.ForTest(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestCheck(t *testing.T) {
	serverName := id("prod", "server").DNSName("tunmesh")
	req := func(client spiffe.ID, peer, src netip.Addr, sni string) Request {
		return Request{ClientID: client, ServerName: sni, Peer: peer, Header: tunnel.Header{Src: src, Dst: netip.AddrPortFrom(dstIP, 8080)}}
	}
	for _, tc := range []struct {
		name string
		req  Request
		want tunnel.Reason
	}{
		{"own pod from its node", req(id("prod", "default"), nodeA, srcIP, serverName), tunnel.ReasonNone},
		// Item 5: right identity, wrong node.
		{"same identity from another node", req(id("prod", "default"), nodeB, srcIP, serverName), tunnel.ReasonSourceNotOwned},
		{"other identity", req(id("prod", "batch"), nodeA, srcIP, serverName), tunnel.ReasonSourceNotOwned},
		{"unknown source address", req(id("prod", "default"), nodeA, netip.MustParseAddr("10.244.9.9"), serverName), tunnel.ReasonSourceNotOwned},
		{"reused IP: terminating holder's identity", req(id("prod", "default"), nodeA, reuseIP, serverName), tunnel.ReasonSourceNotOwned},
		{"reused IP: new holder's identity", req(id("prod", "batch"), nodeA, reuseIP, serverName), tunnel.ReasonNone},
		{"two live pods with one IP", req(id("prod", "default"), nodeA, twinIP, serverName), tunnel.ReasonSourceNotOwned},
		{"no peer address", req(id("prod", "default"), netip.Addr{}, srcIP, serverName), tunnel.ReasonSourceNotOwned},
		{"wrong server name", req(id("prod", "default"), nodeA, srcIP, id("prod", "other").DNSName("tunmesh")), tunnel.ReasonUnknownDestination},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, got, detail := newAcceptor(t).Check(tc.req)
			if got != tc.want {
				t.Fatalf("Check = %s (%s), want %s", got, detail, tc.want)
			}
		})
	}
}

// TestCheckWaitForUnknownSource (issue 12, Jobs): a pod's first call can
// reach the destination agent before the pod's kubelet has reported its IP
// to the API. A source the view does not know yet waits, bounded, for the
// view to learn it, and the whole check runs again; still unknown at the
// bound, or known as someone else, is refused. A source known as another
// pod is refused at once (no wait).
func TestCheckWaitForUnknownSource(t *testing.T) {
	const bound = 300 * time.Millisecond
	serverName := id("prod", "server").DNSName("tunmesh")
	job := func(sa, node string) *corev1.Pod { return srcPod("job", sa, srcIP.String(), node, false) }
	for _, tc := range []struct {
		name    string
		start   []*corev1.Pod // holders of srcIP when the tunnel arrives
		later   []*corev1.Pod // what the view learns after 50ms (nil: nothing)
		cancel  bool          // the agent stops while waiting
		want    tunnel.Reason
		waitMin time.Duration // at least this long waited
		waitMax time.Duration // at most this long
	}{
		{name: "learned while waiting", later: []*corev1.Pod{job("default", nodeA.String())},
			want: tunnel.ReasonNone, waitMin: 40 * time.Millisecond, waitMax: bound},
		{name: "never learned: refused at the bound",
			want: tunnel.ReasonSourceNotOwned, waitMin: bound, waitMax: 3 * bound},
		{name: "learned as another identity: refused", later: []*corev1.Pod{job("batch", nodeA.String())},
			want: tunnel.ReasonSourceNotOwned, waitMin: 40 * time.Millisecond, waitMax: bound},
		{name: "learned on another node: refused", later: []*corev1.Pod{job("default", nodeB.String())},
			want: tunnel.ReasonSourceNotOwned, waitMin: 40 * time.Millisecond, waitMax: bound},
		{name: "known as another identity: refused at once", start: []*corev1.Pod{job("batch", nodeA.String())},
			later: []*corev1.Pod{job("default", nodeA.String())}, want: tunnel.ReasonSourceNotOwned, waitMax: 0},
		{name: "known, no wait", start: []*corev1.Pod{job("default", nodeA.String())}, want: tunnel.ReasonNone, waitMax: 0},
		{name: "terminating holder, successor learned",
			start: []*corev1.Pod{srcPod("old", "batch", srcIP.String(), nodeA.String(), true)},
			later: []*corev1.Pod{srcPod("old", "batch", srcIP.String(), nodeA.String(), true), job("default", nodeA.String())},
			want:  tunnel.ReasonNone, waitMin: 40 * time.Millisecond, waitMax: bound},
		{name: "agent stops while waiting", cancel: true, want: tunnel.ReasonSourceNotOwned, waitMin: 40 * time.Millisecond, waitMax: bound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cluster := &learningCluster{pods: map[netip.Addr][]*corev1.Pod{srcIP: tc.start}, changed: make(chan struct{})}
			dst := &pods.Pod{Namespace: "prod", Name: "server", Addrs: []netip.Addr{dstIP}, NIC: 3, ID: id("prod", "server")}
			m := nodemetrics.ForTest()
			a, err := New(Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh", SourceWait: bound},
				fakeLocal{dstIP: dst}, cluster, noCerts{}, noDial{}, m, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			timer := time.AfterFunc(50*time.Millisecond, func() {
				if tc.cancel {
					cancel()
				}
				if tc.later != nil {
					cluster.learn(srcIP, tc.later...)
				}
			})
			defer timer.Stop()
			r := Request{ClientID: id("prod", "default"), ServerName: serverName, Peer: nodeA,
				Header: tunnel.Header{Src: srcIP, Dst: netip.AddrPortFrom(dstIP, 8080)}}
			got, reason, detail, waited := a.CheckWait(ctx, r)
			if reason != tc.want {
				t.Fatalf("CheckWait = %s (%s), want %s", reason, detail, tc.want)
			}
			if (reason == tunnel.ReasonNone) != (got == dst) {
				t.Fatalf("destination %v with reason %s", got, reason)
			}
			if waited < tc.waitMin || waited > tc.waitMax {
				t.Fatalf("waited %s, want between %s and %s (%s)", waited, tc.waitMin, tc.waitMax, detail)
			}
		})
	}
}

// scriptedListener returns the scripted Accept results in order, then
// blocks until closed.
type scriptedListener struct {
	mu     sync.Mutex
	script []error
	closed chan struct{}
	once   sync.Once
}

func (l *scriptedListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if len(l.script) > 0 {
		err := l.script[0]
		l.script = l.script[1:]
		l.mu.Unlock()
		return nil, err
	}
	l.mu.Unlock()
	<-l.closed
	return nil, net.ErrClosed
}
func (l *scriptedListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *scriptedListener) Addr() net.Addr { return &net.TCPAddr{} }

// TestServeNeverStopsSilently (item 9): temporary Accept errors are retried
// and readiness holds; a fatal one is returned and fails readiness (the
// old loop returned nil and the agent stayed Ready without a listener).
func TestServeNeverStopsSilently(t *testing.T) {
	a := newAcceptor(t)
	if a.Ready() == nil {
		t.Fatal("ready before serving")
	}
	ln := &scriptedListener{script: []error{syscall.EMFILE, syscall.ECONNABORTED}, closed: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(ctx, ln) }()
	time.Sleep(100 * time.Millisecond) // past two backoffs
	if err := a.Ready(); err != nil {
		t.Fatalf("not ready after temporary errors: %v", err)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Serve after cancel = %v, want nil", err)
	}

	a = newAcceptor(t)
	fatal := errors.New("listener broke")
	ln = &scriptedListener{script: []error{fatal}, closed: make(chan struct{})}
	err := a.Serve(context.Background(), ln)
	if !errors.Is(err, fatal) {
		t.Fatalf("Serve = %v, want the fatal error", err)
	}
	if a.Ready() == nil {
		t.Fatal("still ready after the listener failed")
	}
}

// TestHandshakeLimits (item 8): connections that never finish their
// handshake (garbage or silence to :4143) hold at most the per-peer
// number of handshake slots; past it a connection is closed at once and
// counted, and the listener keeps serving.
func TestHandshakeLimits(t *testing.T) {
	local := fakeLocal{}
	m := nodemetrics.ForTest()
	a, err := New(Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh", MaxHandshakesPerPeer: 2},
		local, fakeCluster{}, noCerts{}, noDial{}, m, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })

	var silent []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		silent = append(silent, c)
	}
	time.Sleep(100 * time.Millisecond) // both hold a handshake slot
	over, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	_ = over.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := over.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("third silent connection from one peer: read err %v, want it closed at once", err)
	}
	var got dto.Metric
	if err := m.Errors.WithLabelValues("limit_handshakes_peer").Write(&got); err != nil || got.GetCounter().GetValue() != 1 {
		t.Fatalf("limit_handshakes_peer = %v (%v), want 1", got.GetCounter().GetValue(), err)
	}
	if err := a.Ready(); err != nil {
		t.Fatalf("listener not ready after the flood: %v", err)
	}
	_ = silent
}

// syncingAuthorizer cannot tell until synced is closed, then allows.
type syncingAuthorizer struct{ synced chan struct{} }

func (a syncingAuthorizer) PoliciesSynced() <-chan struct{} { return a.synced }
func (a syncingAuthorizer) AuthorizeInbound(Request, *corev1.Pod, *pods.Pod) (bool, bool, string) {
	select {
	case <-a.synced:
		return true, true, "allowed"
	default:
		return false, false, "policies not synced"
	}
}

// TestCheckWaitWokenByPolicySync (review finding 10): a stream that
// arrives before the policies have synced is decided at the sync, not
// after the whole SourceWait.
func TestCheckWaitWokenByPolicySync(t *testing.T) {
	const bound = 3 * time.Second
	cluster := &learningCluster{pods: map[netip.Addr][]*corev1.Pod{srcIP: {srcPod("job", "default", srcIP.String(), nodeA.String(), false)}}, changed: make(chan struct{})}
	dst := &pods.Pod{Namespace: "prod", Name: "server", Addrs: []netip.Addr{dstIP}, NIC: 3, ID: id("prod", "server")}
	authz := syncingAuthorizer{synced: make(chan struct{})}
	a, err := New(Config{TrustDomain: "cluster.local", ControlNamespace: "tunmesh", SourceWait: bound, Authorizer: authz},
		fakeLocal{dstIP: dst}, cluster, noCerts{}, noDial{}, nodemetrics.ForTest(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(50*time.Millisecond, func() { close(authz.synced) })
	defer timer.Stop()
	r := Request{ClientID: id("prod", "default"), ServerName: id("prod", "server").DNSName("tunmesh"), Peer: nodeA,
		Header: tunnel.Header{Src: srcIP, Dst: netip.AddrPortFrom(dstIP, 8080)}}
	got, reason, detail, waited := a.CheckWait(context.Background(), r)
	if reason != tunnel.ReasonNone || got != dst {
		t.Fatalf("CheckWait = %s (%s), want accepted after the sync", reason, detail)
	}
	if waited < 40*time.Millisecond || waited > bound/2 {
		t.Fatalf("waited %s, want woken by the sync (~50ms), not the bound %s", waited, bound)
	}
}
