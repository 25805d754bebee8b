package observe

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/access"
	"github.com/tunmesh/tunmesh/node/capture"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/pods"
)

// fakeAuth: the bearer token is the user; grants are "user subresource ns".
type fakeAuth struct{ grants map[string]bool }

func (f fakeAuth) Authenticate(r *http.Request) (access.User, error) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return access.User{}, access.ErrUnauthenticated
	}
	return access.User{Name: tok, Method: "token"}, nil
}

// Authorize: a grant "user subresource ns" covers every pod of ns (and
// namespace-wide calls), "user subresource ns/pod" that pod only.
func (f fakeAuth) Authorize(_ context.Context, u access.User, a access.Attributes) error {
	if f.grants[u.Name+" "+a.Subresource+" "+a.Namespace] {
		return nil
	}
	if a.Name != "" && f.grants[u.Name+" "+a.Subresource+" "+a.Namespace+"/"+a.Name] {
		return nil
	}
	return access.ErrForbidden
}

type fakePods []*pods.Pod

func (f fakePods) All() []*pods.Pod { return f }

type env struct {
	h    http.Handler
	srv  *httptest.Server
	log  *flowlog.Log
	mu   sync.Mutex
	emit func([]byte, bool)
	logs *syncBuffer // the server logs from its handlers' goroutines while the test reads
}

func newEnv(t *testing.T) *env { return newEnvWith(t, nil) }

// newEnvWith lets a test change the Config before the handler is made.
func newEnvWith(t *testing.T, change func(*Config)) *env {
	e := &env{logs: &syncBuffer{}}
	e.log = flowlog.New(func(a netip.Addr) flowlog.PodRef {
		if a == netip.MustParseAddr("10.1.0.5") {
			return flowlog.PodRef{Namespace: "shop", Name: "web-1", Workload: "web"}
		}
		return flowlog.PodRef{}
	}, nil, flowlog.Options{})
	cfg := Config{
		Auth: fakeAuth{grants: map[string]bool{"alice capture shop": true, "alice tap shop": true, "alice edges shop": true, "carol tap shop/web-1": true, "carol capture shop/web-1": true}},
		Pods: fakePods{{Namespace: "shop", Name: "web-1", NIC: 3, Addrs: []netip.Addr{netip.MustParseAddr("10.1.0.5")}}},
		Log:  e.log,
		TapNIC: func(netstack.NICID, netstack.PacketTap) (func(), error) {
			t.Error("real tm0 tap used")
			return func() {}, nil
		},
		Sources: func(p *pods.Pod, side capture.Side, keep func([]byte) bool) []capture.Source {
			return []capture.Source{{Name: "tm0", LinkType: layers.LinkTypeRaw, Start: func(emit func([]byte, bool)) (func(), error) {
				e.mu.Lock()
				e.emit = emit
				e.mu.Unlock()
				return func() { e.mu.Lock(); e.emit = nil; e.mu.Unlock() }, nil
			}}}
		},
		Certificate: func(id spiffe.ID) (*tls.Certificate, error) {
			return &tls.Certificate{Certificate: [][]byte{[]byte("leaf-der"), []byte("issuer-der")}}, nil
		},
		Logger: slog.New(slog.NewTextHandler(e.logs, nil)),
	}
	if change != nil {
		change(&cfg)
	}
	h, err := Handler(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.h = h
	e.srv = httptest.NewServer(h)
	t.Cleanup(e.srv.Close)
	return e
}

func (e *env) get(t *testing.T, user, path string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", e.srv.URL+path, nil)
	if user != "" {
		req.Header.Set("Authorization", "Bearer "+user)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestAccess(t *testing.T) {
	e := newEnv(t)
	cases := []struct {
		user, path string
		want       int
	}{
		{"", CapturePath + "?namespace=shop&pod=web-1", 401},
		{"bob", CapturePath + "?namespace=shop&pod=web-1", 403},
		{"alice", CapturePath + "?namespace=bank&pod=web-1", 403},
		{"alice", CapturePath + "?namespace=shop&pod=nope&duration=10ms", 404},
		{"alice", CapturePath + "?namespace=shop&pod=web-1&side=air", 400},
		{"alice", CapturePath + "?namespace=shop&pod=web-1&duration=1h", 400},
		{"alice", CapturePath + "?pod=web-1", 400},
		{"bob", TapPath + "?namespace=shop", 403},
		{"alice", EdgesPath, 403}, // cluster-wide needs a cluster-wide grant
		{"alice", EdgesPath + "?namespace=shop", 200},
		{"bob", PodsPath + "?namespace=shop", 403},
		// A grant on one pod: that pod's tap, not the namespace's, not
		// another pod's capture.
		{"carol", TapPath + "?namespace=shop&pod=web-1", 200},
		{"carol", TapPath + "?namespace=shop", 403},
		{"carol", CapturePath + "?namespace=shop&pod=web-2", 403},
		{"carol", CapturePath + "?namespace=bank&pod=web-1", 403},
	}
	for _, c := range cases {
		resp := e.get(t, c.user, c.path)
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s %s: %d, want %d", c.user, c.path, resp.StatusCode, c.want)
		}
	}
	if !strings.Contains(e.logs.String(), "observability call refused") || !strings.Contains(e.logs.String(), "user=bob") {
		t.Fatalf("refusals not logged:\n%s", e.logs.String())
	}
}

// TestCaptureStreams: an allowed capture streams pcapng while packets
// arrive, ends at its count, and is logged with who, which pod, how long.
func TestCaptureStreams(t *testing.T) {
	e := newEnv(t)
	resp := e.get(t, "alice", CapturePath+"?namespace=shop&pod=web-1&count=2")
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/vnd.tcpdump.pcapng" {
		t.Fatalf("status %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	r, err := pcapgo.NewNgReader(resp.Body, pcapgo.NgReaderOptions{}) // the header arrives before any packet
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 500; i++ {
		e.mu.Lock()
		ok := e.emit != nil
		e.mu.Unlock()
		if ok {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	pkt := []byte{0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 1, 0, 6}
	for i := 0; i < 2; i++ {
		e.mu.Lock()
		e.emit(pkt, i == 1)
		e.mu.Unlock()
	}
	n := 0
	for {
		_, _, err := r.ReadPacketData()
		if err != nil {
			break
		}
		n++
	}
	if n != 2 {
		t.Fatalf("%d packets, want 2", n)
	}
	time.Sleep(50 * time.Millisecond)
	l := e.logs.String()
	if !strings.Contains(l, "capture started") || !strings.Contains(l, "capture ended") || !strings.Contains(l, "user=alice") || !strings.Contains(l, "pod=web-1") || !strings.Contains(l, "reason=count") {
		t.Fatalf("capture not logged as it should be:\n%s", l)
	}
}

// TestTapAndEdges: tap streams the namespace's events as JSON lines;
// edges lists the namespace's edges.
func TestTapAndEdges(t *testing.T) {
	e := newEnv(t)
	resp := e.get(t, "alice", TapPath+"?namespace=shop")
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("tap: %d", resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	go func() {
		time.Sleep(50 * time.Millisecond)
		tr := e.log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.1.0.5:5000"), Dst: netip.MustParseAddrPort("10.1.1.9:80"), TLS: flowlog.TLSTrue})
		tr.Close(1, 2, "clean")
	}()
	var types []string
	for len(types) < 2 && sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var ev flowlog.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatal(err)
		}
		types = append(types, ev.Type)
	}
	if strings.Join(types, ",") != "open,close" {
		t.Fatalf("tap events %v", types)
	}
	er := e.get(t, "alice", EdgesPath+"?namespace=shop")
	defer er.Body.Close()
	var edges []flowlog.Edge
	if err := json.NewDecoder(er.Body).Decode(&edges); err != nil {
		t.Fatal(err)
	}
	if len(edges) != 1 || edges[0].Src.Name != "web-1" || edges[0].TLS != "true" || edges[0].DstAddr != "10.1.1.9:80" {
		t.Fatalf("edges %+v", edges)
	}
}

// TestPods: the node's meshed pods with their certificate chains.
func TestPods(t *testing.T) {
	e := newEnv(t)
	resp := e.get(t, "alice", PodsPath+"?namespace=shop")
	defer resp.Body.Close()
	var pcs []PodCert
	if err := json.NewDecoder(resp.Body).Decode(&pcs); err != nil {
		t.Fatal(err)
	}
	if len(pcs) != 1 || pcs[0].Name != "web-1" || strings.Count(pcs[0].Chain, "BEGIN CERTIFICATE") != 2 {
		t.Fatalf("pods %+v", pcs)
	}
}

// TestEdgesOfOneNamespace: a namespace's edges leave out the connections
// of another namespace's pods.
func TestEdgesOfOneNamespace(t *testing.T) {
	e := newEnv(t)
	e.log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.1.0.5:5000"), Dst: netip.MustParseAddrPort("10.1.1.9:80"), TLS: flowlog.TLSTrue})
	e.log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.3.0.1:5000"), Dst: netip.MustParseAddrPort("10.3.0.2:80"), TLS: flowlog.TLSTrue,
		SrcPod: flowlog.PodRef{Namespace: "bank", Name: "api-1"}, DstPod: flowlog.PodRef{Namespace: "bank", Name: "db-1"}})
	resp := e.get(t, "alice", EdgesPath+"?namespace=shop")
	defer resp.Body.Close()
	var edges []flowlog.Edge
	if err := json.NewDecoder(resp.Body).Decode(&edges); err != nil {
		t.Fatal(err)
	}
	if len(edges) != 1 || edges[0].Src.Namespace != "shop" {
		t.Fatalf("shop's edges %+v, want web-1's connection only", edges)
	}
}

// syncBuffer is a log sink safe for the handlers' goroutines and the test
// at once (a handler's deferred log line may land after its response).
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
