package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/access"
	"github.com/tunmesh/tunmesh/node/capture"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observe"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

// ObserveConfig configures the observability API (capture, tap, edges)
// and the connection accounting behind it.
type ObserveConfig struct {
	// Addr serves the API over TLS (default <node-ip>:4192).
	Addr string
	// ClientCAFile, if set, holds the CAs whose client certificates
	// authenticate callers (as the kubelet's --client-ca-file). Without it
	// the agent follows the cluster's client CA as the API server
	// publishes it for aggregated API servers (ConfigMap
	// kube-system/extension-apiserver-authentication), so that cert-based
	// kubeconfigs work with no configuration and send no secret.
	ClientCAFile string
	// CertFile and KeyFile, if set, are the API's serving certificate;
	// by default the agent makes a self-signed one at start.
	CertFile, KeyFile string
	// NoHTTPMetrics turns off the HTTP/1 parser on meshed connections
	// except while someone taps (the HTTP series then stay empty).
	NoHTTPMetrics bool
}

// observability is the agent's connection accounting and the API that
// shows it.
type observability struct {
	flows *flowlog.Log
	gate  *access.Gate
	// cas are the client CAs; follow says they come from the cluster's
	// ConfigMap (no --client-ca-file) and are re-read while serving.
	cas    *access.ClientCAs
	follow bool
	syns   recentSYNs
}

// recentSYNs remembers the plaintext connections just recorded: one may be
// seen several times (a SYN routed out a bridge and then out the pod's
// veth; the pod's SYN-ACK through tm0). It runs on the TUN path, so every
// call is O(1): two generations of at most synGeneration keys, the older
// dropped whole when the newer is synMemory old or full.
type recentSYNs struct {
	mu        sync.Mutex // guards the fields below
	cur, prev map[[2]netip.AddrPort]time.Time
	curSince  time.Time
}

const (
	synMemory     = 3 * time.Second
	synGeneration = 4096
)

// first reports whether k was not seen within synMemory (a key may be
// forgotten sooner when more than synGeneration arrive within it: then it
// counts twice, which only the edges' counts show).
func (r *recentSYNs) first(k [2]netip.AddrPort, now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t, ok := r.cur[k]; ok && now.Sub(t) < synMemory {
		return false
	}
	if t, ok := r.prev[k]; ok && now.Sub(t) < synMemory {
		return false
	}
	if r.cur == nil || now.Sub(r.curSince) >= synMemory || len(r.cur) >= synGeneration {
		r.prev, r.cur, r.curSince = r.cur, make(map[[2]netip.AddrPort]time.Time, 64), now
	}
	r.cur[k] = now
	return true
}

// newObservability builds the accounting (before the data path, which
// records into it) and the access gate.
func (a *Agent) newObservability() error {
	m, err := flowlog.NewMetrics(a.reg, 0)
	if err != nil {
		return err
	}
	names := func(addr netip.Addr) flowlog.PodRef {
		p, err := a.view.PodByAddr(addr)
		if err != nil || p == nil {
			return flowlog.PodRef{}
		}
		return flowlog.Ref(p)
	}
	// Tokens must be bound to access.Audience: an API-server token is
	// refused, so none is ever handed to an agent.
	cas := &access.ClientCAs{}
	// Answers are cached with the kubelet's TTLs (access.TokenTTL, ...).
	gate := &access.Gate{Reviewer: access.NewCachedReviewer(access.KubeReviewer{Client: a.client, Audiences: []string{access.Audience}}), ClientCAs: cas.Pool}
	follow := true
	if f := a.cfg.Observe.ClientCAFile; f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("observe client CAs: %w", err)
		}
		if _, err := cas.SetPEM(pem); err != nil {
			return fmt.Errorf("observe client CAs %s: %w", f, err)
		}
		follow = false
	}
	a.obs = &observability{flows: flowlog.New(names, m, flowlog.Options{HTTP: !a.cfg.Observe.NoHTTPMetrics}), gate: gate, cas: cas, follow: follow}
	return nil
}

// passthroughSYNACK records a plaintext connection that reached a local
// pod from outside the mesh and whose replies go through tm0
// (netstack.Options.OnPassthroughSYNACK).
func (a *Agent) passthroughSYNACK(_ netstack.NICID, pod, peer netip.AddrPort) {
	a.plaintextInbound(peer, pod)
}

// plaintextInbound records a connection from outside the mesh to a local
// meshed pod (once).
func (a *Agent) plaintextInbound(peer, pod netip.AddrPort) {
	if a.registry.ByAddr(pod.Addr()) == nil || !a.obs.syns.first([2]netip.AddrPort{peer, pod}, time.Now()) {
		return
	}
	a.obs.flows.Seen(flowlog.Conn{Proxy: flowlog.In, Src: peer, Dst: pod, TLS: flowlog.NotProvidedByRemote})
}

// serveObservability serves the API until ctx ends.
func (a *Agent) serveObservability(ctx context.Context, st *netstack.Stack) error {
	addr := a.cfg.Observe.Addr
	if addr == "" {
		addr = net.JoinHostPort(a.cfg.NodeIP.String(), strconv.Itoa(observe.DefaultPort))
	}
	var cert *tls.Certificate
	if a.cfg.Observe.CertFile != "" {
		c, err := tls.LoadX509KeyPair(a.cfg.Observe.CertFile, a.cfg.Observe.KeyFile)
		if err != nil {
			return fmt.Errorf("observe serving certificate: %w", err)
		}
		cert = &c
	}
	tlsCfg, fingerprint, err := observe.TLSConfig(a.cfg.NodeName, a.cfg.NodeIP, cert, a.obs.cas.Pool)
	if err != nil {
		return err
	}
	if a.obs.follow {
		fctx, fcancel := context.WithCancel(ctx)
		followed := make(chan struct{})
		go func() { // RoutineFollowClientCA: re-reads the cluster's client CA until ctx ends
			defer close(followed)
			a.obs.cas.Follow(fctx, a.client, access.ClientCARefresh, a.log.With("component", "observe"))
		}()
		defer func() { fcancel(); <-followed }()
	}
	h, err := observe.Handler(observe.Config{
		Auth: a.obs.gate, Pods: a.registry, Log: a.obs.flows, TapNIC: st.TapNIC,
		MeshPort: uint16(a.cfg.MeshPort), Logger: a.log.With("component", "observe"), Registerer: a.reg,
		Certificate: func(id spiffe.ID) (*tls.Certificate, error) {
			cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			defer cancel()
			return a.certs.Certificate(cctx, id)
		},
	})
	if err != nil {
		return err
	}
	// Connections into pods from the node's side (kubelet probes: their
	// replies skip tm0) are seen as SYNs crossing the node's namespace.
	// Without CAP_NET_RAW the watch (and capture's eth0 and wire sides)
	// cannot open packet sockets: the rest of the API still works.
	if stopSYNs, err := capture.WatchSYNs(func(src, dst netip.AddrPort) { a.plaintextInbound(src, dst) }); err != nil {
		a.log.Warn("plaintext connections into pods from the node's side (kubelet probes) will not show in edges and tap", "err", err)
	} else {
		defer stopSYNs()
	}
	// WriteTimeout bounds the plain answers (edges, pods); the streams set
	// their own write deadlines (a capture's duration plus grace, a tap's
	// per write), so a reader that stops reading frees its stream.
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second, TLSConfig: tlsCfg}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen observe: %w", err)
	}
	a.log.Info("observability API listening", "addr", ln.Addr().String(), "certificate_sha256", fingerprint, "client_ca", clientCASource(a.cfg.Observe.ClientCAFile))
	// Callers pin the certificate from the Node's annotation.
	pctx, pcancel := context.WithCancel(ctx)
	published := make(chan struct{})
	go func() { // RoutinePublishFingerprint: retries until it succeeds or ctx ends
		defer close(published)
		a.publishFingerprint(pctx, fingerprint)
	}()
	defer func() { pcancel(); <-published }()
	return serveStreams(ctx, srv, tls.NewListener(ln, tlsCfg), 3*time.Second)
}

// serveStreams serves until ctx ends, then stops the streams too: every
// request's context derives from ctx (a capture or tap ends as ctx does),
// Shutdown waits up to grace for the handlers, and Close then cuts the
// connections of any that are still writing.
func serveStreams(ctx context.Context, srv *http.Server, ln net.Listener, grace time.Duration) error {
	srv.BaseContext = func(net.Listener) context.Context { return ctx }
	served, stopped := make(chan struct{}), make(chan struct{})
	go func() { // RoutineObserveShutdown: ends with ctx, or when Serve fails
		defer close(stopped)
		select {
		case <-ctx.Done():
		case <-served:
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), grace)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close()
		}
	}()
	err := srv.Serve(ln)
	close(served)
	<-stopped // Shutdown has returned: the handlers too, or their connections are closed
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	_ = srv.Close()
	return err
}

// publishFingerprint sets the serving certificate's fingerprint on the
// agent's Node (observeapi.FingerprintAnnotation), retrying with backoff.
func (a *Agent) publishFingerprint(ctx context.Context, fingerprint string) {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{observeapi.FingerprintAnnotation: fingerprint}}})
	if err != nil {
		a.log.Error("observability certificate fingerprint not published", "err", err)
		return
	}
	for wait := 500 * time.Millisecond; ; wait = min(2*wait, 30*time.Second) {
		_, err := a.client.CoreV1().Nodes().Patch(ctx, a.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{})
		if err == nil {
			return
		}
		a.log.Warn("publish the observability certificate fingerprint on the node (retrying)", "node", a.cfg.NodeName, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func clientCASource(file string) string {
	if file != "" {
		return file
	}
	return access.ClientCANamespace + "/" + access.ClientCAConfigMap
}
