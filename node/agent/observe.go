package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/access"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observe"
)

// ObserveConfig configures the observability API (capture, tap, edges)
// and the connection accounting behind it.
type ObserveConfig struct {
	// Addr serves the API over TLS (default <node-ip>:4192).
	Addr string
	// ClientCAFile, if set, holds the CAs whose client certificates
	// authenticate callers (the cluster's client CA, as the kubelet's
	// --client-ca-file); without it only bearer tokens (TokenReview) are
	// accepted.
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
	gate := &access.Gate{Reviewer: access.KubeReviewer{Client: a.client}}
	if f := a.cfg.Observe.ClientCAFile; f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("observe client CAs: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("observe client CAs %s: no certificate", f)
		}
		gate.ClientCAs = pool
	}
	a.obs = &observability{flows: flowlog.New(names, m, flowlog.Options{HTTP: !a.cfg.Observe.NoHTTPMetrics}), gate: gate}
	return nil
}

// passthroughSYNACK records a plaintext connection that reached a local
// pod from outside the mesh (netstack.Options.OnPassthroughSYNACK).
func (a *Agent) passthroughSYNACK(_ netstack.NICID, pod, peer netip.AddrPort) {
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
	tlsCfg, fingerprint, err := observe.TLSConfig(a.cfg.NodeName, a.cfg.NodeIP, cert, a.obs.gate.ClientCAs)
	if err != nil {
		return err
	}
	h, err := observe.Handler(observe.Config{
		Auth: a.obs.gate, Pods: a.registry, Log: a.obs.flows, TapNIC: st.TapNIC,
		MeshPort: uint16(a.cfg.MeshPort), Logger: a.log.With("component", "observe"),
	})
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, TLSConfig: tlsCfg}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen observe: %w", err)
	}
	a.log.Info("observability API listening", "addr", ln.Addr().String(), "certificate_sha256", fingerprint, "client_certificates", a.obs.gate.ClientCAs != nil)
	return serveHTTP(ctx, srv, tls.NewListener(ln, tlsCfg))
}
