// Package agent is tunmesh-node, the per-node agent: it takes pods from the
// CNI plugin, attaches their TUN to the node's netstack, decides per flow
// whether to mesh it (policy, service resolution), carries meshed flows to
// the destination node's agent inside mTLS with the pods' identities, and
// delivers inbound tunnels into the destination pod with the client pod's
// address as source.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/tun"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/resolve"
)

// Config configures the agent.
type Config struct {
	NodeName string
	NodeIP   netip.Addr // the address peers dial on MeshPort
	// Cluster lists the pod and service CIDRs routed into tm0.
	Cluster []netip.Prefix
	// CNISocket is where the plugin reaches the agent.
	CNISocket string
	// MeshPort is the mTLS tunnel port (default 4143).
	MeshPort int
	// AdminAddr serves /metrics, /ready and the identity certificates
	// (default ":4191").
	AdminAddr string
	// TrustDomain and ControlNamespace shape SPIFFE IDs and DNS SANs.
	TrustDomain, ControlNamespace string
	// HostTUN is the device in the node's namespace that receives
	// passthrough packets (default "tmhost").
	HostTUN string
	// TUNMTU is the pods' tm0 MTU (default 65520); UnderlayMTU clamps the
	// MSS of passthrough flows (default 1500).
	TUNMTU, UnderlayMTU int
	// ExcludedNamespaces are never meshed.
	ExcludedNamespaces []string
	// StateDir keeps what a restarted agent needs (default /var/lib/tunmesh).
	StateDir string
}

func (c *Config) defaults() error {
	if c.NodeName == "" || !c.NodeIP.IsValid() || len(c.Cluster) == 0 || c.CNISocket == "" {
		return errors.New("agent config: node name, node IP, cluster CIDRs and CNI socket are required")
	}
	if c.MeshPort == 0 {
		c.MeshPort = 4143
	}
	if c.AdminAddr == "" {
		c.AdminAddr = ":" + strconv.Itoa(workload.AdminPort)
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	if c.ControlNamespace == "" {
		c.ControlNamespace = "tunmesh"
	}
	if c.HostTUN == "" {
		c.HostTUN = "tmhost"
	}
	if c.TUNMTU == 0 {
		c.TUNMTU = 65520
	}
	if c.UnderlayMTU == 0 {
		c.UnderlayMTU = 1500
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/tunmesh"
	}
	return nil
}

// Agent is the node agent. New starts nothing; Run serves until ctx ends.
type Agent struct {
	cfg      Config
	client   kubernetes.Interface
	certs    *workload.Manager
	roots    *x509.CertPool
	log      *slog.Logger
	reg      *prometheus.Registry
	metrics  *metrics
	policy   policy.Config
	resolver *resolve.Resolver
	cluster  *clusterPods
	local    *localPods
	stack    *netstack.Stack
	recorder record.EventRecorder
	pending  pendingFlows
}

// New checks its dependencies. certs must be run by the caller (or Run).
func New(cfg Config, client kubernetes.Interface, certs *workload.Manager, roots *x509.CertPool, reg *prometheus.Registry, log *slog.Logger) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if client == nil || certs == nil || roots == nil || reg == nil || log == nil {
		return nil, errors.New("agent: nil dependency")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	res, err := resolve.New(client, log.With("component", "resolver"))
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, client: client, certs: certs, roots: roots, log: log, reg: reg, metrics: m,
		policy:   policy.Config{ExcludedNamespaces: append([]string{"kube-system", cfg.ControlNamespace}, cfg.ExcludedNamespaces...)},
		resolver: res,
		local:    newLocalPods(),
	}
	a.cluster = newClusterPods(client)
	a.pending.m = map[netstack.Flow]*target{}
	return a, nil
}

func (a *Agent) identity(ns, sa string) spiffe.ID {
	return spiffe.ID{TrustDomain: a.cfg.TrustDomain, Namespace: ns, ServiceAccount: sa}
}

// Run starts everything and blocks until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	a.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tunmesh-node", Host: a.cfg.NodeName})

	// Passthrough packets leave through a TUN in the node's namespace, as
	// if they had arrived from the pod's side; the kernel routes them on.
	hostFD, err := tun.CreateInNetns("/proc/self/ns/net", a.cfg.HostTUN, a.cfg.TUNMTU)
	if err != nil {
		return fmt.Errorf("create host tun %s: %w", a.cfg.HostTUN, err)
	}
	defer func() { _ = tun.Delete("/proc/self/ns/net", a.cfg.HostTUN) }()
	defer closeFD(hostFD)
	for _, k := range []string{"all", a.cfg.HostTUN} {
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+k+"/rp_filter", []byte("0"), 0o644); err != nil {
			return fmt.Errorf("rp_filter off on %s: %w", k, err)
		}
	}
	st, err := netstack.New(netstack.Options{
		Handler:     &outbound{a: a},
		Passthrough: netstack.FDWriter(hostFD),
		UnderlayMTU: a.cfg.UnderlayMTU,
	}, a.log.With("component", "netstack"))
	if err != nil {
		return fmt.Errorf("start netstack: %w", err)
	}
	a.stack = st
	defer st.Close()
	collector := stackCollector{stats: st.Stats}
	if err := a.reg.Register(collector); err != nil {
		return fmt.Errorf("register netstack metrics: %w", err)
	}
	defer a.reg.Unregister(collector)

	meshLn, err := net.Listen("tcp", net.JoinHostPort(a.cfg.NodeIP.String(), strconv.Itoa(a.cfg.MeshPort)))
	if err != nil {
		return fmt.Errorf("listen for the mesh: %w", err)
	}
	cniLn, err := cniapi.Listen(a.cfg.CNISocket)
	if err != nil {
		return fmt.Errorf("listen for the CNI plugin: %w", err)
	}
	cniSrv := &http.Server{Handler: cniapi.NewHandler(&cniAgent{a: a}, a.log.With("component", "cni")), ReadHeaderTimeout: 10 * time.Second}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if !a.resolver.Synced() || !a.cluster.synced() {
			http.Error(w, "informers not synced", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET "+workload.CertificatesPath, a.certs.CertificatesHandler())
	adminSrv := &http.Server{Addr: a.cfg.AdminAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	// Pods attached by a previous run come back before new ones are taken.
	a.restore(ctx)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.certs.Run(gctx) })
	g.Go(func() error { return a.resolver.Run(gctx) })
	g.Go(func() error { return a.cluster.run(gctx) })
	g.Go(func() error { return a.serveMesh(gctx, meshLn) })
	g.Go(func() error { return serveHTTP(gctx, cniSrv, cniLn) })
	g.Go(func() error {
		ln, err := net.Listen("tcp", a.cfg.AdminAddr)
		if err != nil {
			return fmt.Errorf("listen admin: %w", err)
		}
		return serveHTTP(gctx, adminSrv, ln)
	})
	a.log.Info("agent running", "node", a.cfg.NodeName, "mesh", meshLn.Addr().String(), "cni_socket", a.cfg.CNISocket)
	err = g.Wait()
	a.local.closeAll(a)
	return err
}

func serveHTTP(ctx context.Context, srv *http.Server, ln net.Listener) error {
	go func() { // RoutineShutdown: ends with ctx
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
