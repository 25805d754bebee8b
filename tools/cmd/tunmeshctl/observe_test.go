package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

func ref(ns, name, wl string) flowlog.PodRef {
	return flowlog.PodRef{Namespace: ns, Name: name, Workload: wl}
}

// TestEdgeRows: the agents' edges merge into rows; the client's reason
// for a plaintext connection wins over the server's "not provided by
// remote"; deploy rows group pods by workload.
func TestEdgeRows(t *testing.T) {
	hello, world, world2 := ref("demo", "hello-1", "hello"), ref("demo", "world-1", "world"), ref("demo", "world-2", "world")
	edges := []flowlog.Edge{
		{Src: hello, Dst: world, Proxy: "out", TLS: "true", ClientID: "spiffe://c/ns/demo/sa/hello", ServerID: "spiffe://c/ns/demo/sa/world", Conns: 2},
		{Src: hello, Dst: world2, Proxy: "out", TLS: "true", ClientID: "spiffe://c/ns/demo/sa/hello", ServerID: "spiffe://c/ns/demo/sa/world", Conns: 1},
		{Src: hello, Dst: world, Proxy: "out", TLS: "skipped_port", Conns: 1},
		{Src: hello, Dst: world, Proxy: "in", TLS: "not_provided_by_remote", Conns: 1}, // the server's view of the same
		{SrcAddr: "10.244.1.1", Dst: world, Proxy: "in", TLS: "not_provided_by_remote", Conns: 3},
	}
	var out bytes.Buffer
	if err := printEdges(&out, edgeRows(edges, byPod), "wide"); err != nil {
		t.Fatal(err)
	}
	want := `SRC         DST      SRC_NS  DST_NS  SECURED  CLIENT_ID                    SERVER_ID                    MSG
10.244.1.1  world-1  -       demo    ×        -                            -                            not_provided_by_remote
hello-1     world-1  demo    demo    √        spiffe://c/ns/demo/sa/hello  spiffe://c/ns/demo/sa/world  -
hello-1     world-1  demo    demo    ×        -                            -                            skipped_port
hello-1     world-2  demo    demo    √        spiffe://c/ns/demo/sa/hello  spiffe://c/ns/demo/sa/world  -
`
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
	rows := edgeRows(edges, byWorkload)
	var secured *edgeRow
	for i := range rows {
		if rows[i].Secured {
			if secured != nil {
				t.Fatalf("workload rows not merged: %+v", rows)
			}
			secured = &rows[i]
		}
	}
	if secured == nil || secured.Src != "hello" || secured.Dst != "world" || secured.Conns != 3 {
		t.Fatalf("workload row %+v", secured)
	}
	for _, r := range edgeRows(edges, byNamespace) {
		if r.Secured && (r.Src != "demo" || r.Dst != "demo" || r.Conns != 3) {
			t.Fatalf("namespace row %+v", r)
		}
	}
}

func TestTapFilter(t *testing.T) {
	conn := flowlog.Conn{ID: 7, Proxy: "out", Src: netip.MustParseAddrPort("10.0.0.1:5000"), Dst: netip.MustParseAddrPort("10.0.0.2:80"),
		SrcPod: ref("demo", "hello-1", "hello"), DstPod: ref("demo", "world-1", "world"), TLS: "true"}
	f := tapFilter{ns: "demo", names: map[string]bool{"hello-1": true}, to: map[string]bool{"world-1": true}, method: "GET", path: "/api", reqs: map[string]flowlog.Event{}}
	cases := []struct {
		e    flowlog.Event
		want bool
	}{
		{flowlog.Event{Type: "open", Conn: conn}, false}, // a method filter shows requests only
		{flowlog.Event{Type: "req", Conn: conn, Method: "GET", Path: "/api/x"}, true},
		{flowlog.Event{Type: "req", Conn: conn, Method: "POST", Path: "/api/x"}, false},
		{flowlog.Event{Type: "rsp", Conn: conn, Method: "GET", Path: "/api/x", Status: 200}, true},
		{flowlog.Event{Type: "end", Conn: conn}, true},
		{flowlog.Event{Type: "end", Conn: conn}, false}, // no open exchange left
	}
	for i, c := range cases {
		if got := f.keep(c.e); got != c.want {
			t.Errorf("case %d (%s): keep %v, want %v", i, c.e.Type, got, c.want)
		}
	}
	other := conn
	other.DstPod = ref("demo", "db-1", "db")
	all := tapFilter{ns: "demo", names: map[string]bool{"hello-1": true}, to: map[string]bool{"world-1": true}, reqs: map[string]flowlog.Event{}}
	if all.keep(flowlog.Event{Type: "open", Conn: other}) {
		t.Error("--to: a connection to another pod kept")
	}
	if !all.keep(flowlog.Event{Type: "open", Conn: conn}) {
		t.Error("tcp open dropped without a method filter")
	}
	in := conn
	in.Proxy = "in" // the local pod is the server: world-1, not hello-1
	if all.keep(flowlog.Event{Type: "open", Conn: in}) {
		t.Error("inbound side of another pod kept")
	}
}

func TestResolvePods(t *testing.T) {
	sel := &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}
	pod := func(name string, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, Labels: map[string]string{"app": "web"}}, Status: corev1.PodStatus{Phase: phase}}
	}
	client := fake.NewClientset(
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"}, Spec: appsv1.DeploymentSpec{Selector: sel}},
		pod("web-b", corev1.PodRunning), pod("web-a", corev1.PodRunning), pod("web-c", corev1.PodPending),
	)
	ctx := context.Background()
	ps, err := resolvePods(ctx, client, "shop", "deploy/web")
	if err != nil || len(ps) != 2 || ps[0].Name != "web-a" {
		t.Fatalf("deploy/web: %v %v", ps, err)
	}
	if ps, err := resolvePods(ctx, client, "shop", "web-c"); err != nil || len(ps) != 1 {
		t.Fatalf("a pod by name: %v %v", ps, err)
	}
	for _, bad := range []string{"svc/web", "deploy/nope", "nope"} {
		if _, err := resolvePods(ctx, client, "shop", bad); err == nil || !strings.Contains(err.Error(), "") {
			t.Errorf("%s resolved", bad)
		}
	}
}

// TestObserveCommandsDoNotLinkTheAgent: capture, edges and tap speak the
// agents' API through node/observeapi; tunmeshctl links no gVisor.
func TestObserveCommandsDoNotLinkTheAgent(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: go command not in PATH")
	}
	out, err := exec.Command(gobin, "list", "-deps", "github.com/tunmesh/tunmesh/tools/cmd/tunmeshctl").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "gvisor.dev/") || pkg == "github.com/tunmesh/tunmesh/node/observe" || pkg == "github.com/tunmesh/tunmesh/netstack" {
			t.Errorf("tunmeshctl depends on %s", pkg)
		}
	}
}

// TestAgentsClient: the client finds the node's InternalIP, speaks TLS to
// the agent's port with the bearer token, and maps refusals to
// errForbidden with the agent's message.
func TestAgentsClient(t *testing.T) {
	var gotAuth, gotQuery string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth, gotQuery = r.Header.Get("Authorization"), r.URL.RawQuery
		if r.URL.Query().Get("namespace") == "bank" {
			http.Error(w, `user "x" may not get pods/edges.tap.tunmesh.io in bank`, http.StatusForbidden)
			return
		}
		_, _ = w.Write([]byte("[]"))
	}))
	defer srv.Close()
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	sum := sha256.Sum256(srv.Certificate().Raw)
	node := func(name, fp string) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: name}, {Type: corev1.NodeInternalIP, Address: host}}}}
		if fp != "" {
			n.Annotations = map[string]string{observeapi.FingerprintAnnotation: fp}
		}
		return n
	}
	client := fake.NewClientset(node("n1", hex.EncodeToString(sum[:])))
	a := &agents{client: client, port: p, token: "tok"}
	a.setTransport(&tls.Config{}, (&net.Dialer{}).DialContext)
	tr := a.http.Transport.(*http.Transport)
	ctx := context.Background()
	resp, err := a.get(ctx, "n1", observeapi.EdgesPath, url.Values{"namespace": {"shop"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if gotAuth != "Bearer tok" || gotQuery != "namespace=shop" {
		t.Fatalf("agent got Authorization %q, query %q", gotAuth, gotQuery)
	}
	_, err = a.get(ctx, "n1", observeapi.EdgesPath, url.Values{"namespace": {"bank"}})
	if !errors.Is(err, errForbidden) || !strings.Contains(err.Error(), "may not get pods/edges") {
		t.Fatalf("refusal: %v", err)
	}
	if _, err := a.get(ctx, "nope", observeapi.EdgesPath, nil); err == nil {
		t.Fatal("unknown node: no error")
	}

	// Another certificate than the Node publishes, or none published:
	// nothing is sent.
	for _, fp := range []string{strings.Repeat("0", 64), ""} {
		gotAuth = ""
		client := fake.NewClientset(node("n1", fp))
		a.client = client
		a.pins = sync.Map{}
		tr.CloseIdleConnections()
		_, err := a.get(ctx, "n1", observeapi.EdgesPath, url.Values{"namespace": {"shop"}})
		if !errors.Is(err, errAgentCertificate) || gotAuth != "" {
			t.Fatalf("fingerprint %q: err %v, agent got %q", fp, err, gotAuth)
		}
	}
	a.insecure = true // none published, accepted on request
	tr.CloseIdleConnections()
	if resp, err := a.get(ctx, "n1", observeapi.EdgesPath, url.Values{"namespace": {"shop"}}); err != nil {
		t.Fatalf("--insecure-skip-agent-verify: %v", err)
	} else {
		resp.Body.Close()
	}
}
