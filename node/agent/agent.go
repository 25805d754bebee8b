// Package agent is tunmesh-node, the per-node agent. It only wires the data
// path together; each job lives in its own package, named for what it does:
//
//	pods        CNI hand-off, the registry of meshed pods, state on the node
//	clusterview informers (pods, namespaces) and the synced gate
//	resolve     ClusterIP -> endpoint, from Services and EndpointSlices
//	outbound    the decision for each new flow from a pod (who decides)
//	dialer      the mTLS tunnel to the destination agent (who dials)
//	inbound     the mesh listener and its checks (who accepts and checks)
//	admin       metrics, readiness, certificates
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
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/identity/rbac"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/tun"
	"github.com/tunmesh/tunmesh/node/admin"
	"github.com/tunmesh/tunmesh/node/clusterview"
	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/inbound"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/outbound"
	"github.com/tunmesh/tunmesh/node/pods"
	"github.com/tunmesh/tunmesh/node/policy"
	"github.com/tunmesh/tunmesh/node/release"
	"github.com/tunmesh/tunmesh/node/resolve"
	"github.com/tunmesh/tunmesh/node/wireguard"
	"github.com/tunmesh/tunmesh/node/workers"
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
	// AdminAddr serves the admin API (metrics, readiness, status, the
	// identity certificates). Default: the node address, port 4191; the
	// admin API is not for every interface of the node.
	AdminAddr string
	// TunnelV2Only makes this agent dial tunnels with protocol v2 only
	// (one TLS connection per pod connection, no ALPN offered): an escape
	// hatch during a rollout. The agent still accepts v2 and v3.
	TunnelV2Only bool
	// DebugAddr, if set, serves net/http/pprof there; it must be a
	// loopback address (default: off).
	DebugAddr string
	// DebugHandlers are more handlers for the DebugAddr server, by path
	// (the scheduler knob of cmd/tunmesh-node: /debug/procs).
	DebugHandlers map[string]http.Handler
	// CNIConfDir holds the node's CNI configuration, checked (read only)
	// for tunmesh's plugin in the admin status (default /etc/cni/net.d).
	CNIConfDir string
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
	// ReleaseOnExit says when a stopping agent releases the node's pods
	// from the mesh (tm0 and its routes removed: they talk in plaintext on
	// the primary CNI's path) instead of keeping them attached for the
	// next agent: never (default), or daemonset-deleted (uninstall: only
	// when the API says the agent's DaemonSet is deleted or being
	// deleted; when it cannot tell, the pods stay attached).
	ReleaseOnExit release.Mode
	// PodName and PodNamespace name the agent's own pod (required with
	// ReleaseOnExit daemonset-deleted; PodNamespace defaults to
	// ControlNamespace).
	PodName, PodNamespace string
	// WireGuard is the transport between nodes (wireguard.go).
	WireGuard WireGuardConfig
	// Dynamic reads the Authorization custom resources (required; authz.go).
	Dynamic dynamic.Interface
	// Observe is the observability API and accounting (observe.go).
	Observe ObserveConfig
}

func (c *Config) defaults() error {
	if c.NodeName == "" || !c.NodeIP.IsValid() || len(c.Cluster) == 0 || c.CNISocket == "" {
		return errors.New("agent config: node name, node IP, cluster CIDRs and CNI socket are required")
	}
	if c.MeshPort == 0 {
		c.MeshPort = 4143
	}
	if c.AdminAddr == "" {
		c.AdminAddr = net.JoinHostPort(c.NodeIP.String(), strconv.Itoa(workload.AdminPort))
	}
	if c.DebugAddr != "" {
		if err := checkDebugAddr(c.DebugAddr); err != nil {
			return fmt.Errorf("agent config: %w", err)
		}
	}
	if c.CNIConfDir == "" {
		c.CNIConfDir = "/etc/cni/net.d"
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
	if c.ReleaseOnExit == "" {
		c.ReleaseOnExit = release.Never
	}
	if _, err := release.ParseMode(string(c.ReleaseOnExit)); err != nil {
		return fmt.Errorf("agent config: %w", err)
	}
	if c.PodNamespace == "" {
		c.PodNamespace = c.ControlNamespace
	}
	if c.ReleaseOnExit == release.DaemonSetDeleted && c.PodName == "" {
		return errors.New("agent config: release on exit " + string(release.DaemonSetDeleted) + " needs the agent's pod name")
	}
	return nil
}

// Agent is the node agent. New builds every part (starting nothing); Run
// opens the devices and listeners and serves until ctx ends.
type Agent struct {
	cfg         Config
	client      kubernetes.Interface
	certs       *workload.Manager
	log         *slog.Logger
	reg         *prometheus.Registry
	metrics     *nodemetrics.Metrics
	resolver    *resolve.Resolver
	view        *clusterview.View
	gate        clusterview.Gate
	registry    *pods.Registry
	broadcaster record.EventBroadcaster
	stackRef    *stackRef
	cni         *pods.Handler
	dialer      *dialer.Dialer // pooled tunnel connections; reaped by Run
	outbound    *outbound.Handler
	inbound     *inbound.Acceptor
	release     *release.Watcher     // nil with ReleaseOnExit never
	wg          *wireguard.Transport // nil with transport tcp
	enforcer    *enforcer            // NetworkPolicy and authorization (authz.go)
	obs         *observability       // connection accounting, capture/tap/edges API (observe.go)
	// workers run the per-connection goroutines (each SYN's decision and
	// handshake, tunnel streams' handlers, drainers and copies) on
	// goroutines whose stacks have grown already; closed by Run.
	workers *workers.Pool
}

// Version is the agent's version, set at build time with
// -ldflags "-X github.com/tunmesh/tunmesh/node/agent.Version=v1.2.3".
var Version = "dev"

// New checks its dependencies and builds the agent's parts. certs and res
// are run by Run; res is shared with the caller, which may use it (before
// Run) to reach the identity service through its endpoints.
func New(cfg Config, client kubernetes.Interface, res *resolve.Resolver, certs *workload.Manager, roots *x509.CertPool, reg *prometheus.Registry, log *slog.Logger) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if client == nil || res == nil || certs == nil || roots == nil || reg == nil || log == nil {
		return nil, errors.New("agent: nil dependency")
	}
	m, err := nodemetrics.New(reg)
	if err != nil {
		return nil, err
	}
	view, err := clusterview.New(client)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, client: client, certs: certs, log: log, reg: reg, metrics: m,
		resolver: res, view: view, registry: pods.NewRegistry(),
		gate:        clusterview.Gate{Parts: []func() bool{view.Synced, res.Synced}},
		broadcaster: record.NewBroadcaster(),
		stackRef:    &stackRef{},
		workers:     workers.New(workers.Options{}),
	}
	if err := registerWorkerMetrics(reg, a.workers); err != nil {
		return nil, err
	}
	if err := a.newWireGuard(); err != nil {
		return nil, err
	}
	if err := a.newObservability(); err != nil {
		return nil, err
	}
	pol := policy.Config{ExcludedNamespaces: append([]string{"kube-system", cfg.ControlNamespace}, cfg.ExcludedNamespaces...)}
	if err := a.newEnforcer(pol); err != nil {
		return nil, err
	}
	recorder := a.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tunmesh-node", Host: cfg.NodeName})
	a.cni, err = pods.NewHandler(pods.Config{
		TrustDomain: cfg.TrustDomain, TUNMTU: cfg.TUNMTU, Cluster: cfg.Cluster, Policy: pol, StateDir: cfg.StateDir,
		Synced: a.gate.Synced,
	}, pods.Deps{Client: client, View: view, Registry: a.registry, Stack: a.stackRef, Certs: certs, Metrics: m, Recorder: recorder, Log: log.With("component", "cni")})
	if err != nil {
		return nil, err
	}
	decider := &outbound.Decider{Local: a.registry, Cluster: view, Services: res, Synced: a.gate.Synced, Policy: pol, TrustDomain: cfg.TrustDomain, Access: a.enforcer}
	dl := &dialer.Dialer{Certs: certs, MeshPort: cfg.MeshPort, ControlNamespace: cfg.ControlNamespace, LocalAddr: cfg.NodeIP,
		DisableV3: cfg.TunnelV2Only, DialTCP: a.wgDialTCP(), RouteOf: a.wgRouteOf(), Go: a.workers.Go, Metrics: m, Log: log.With("component", "dialer")}
	a.dialer = dl
	a.outbound, err = outbound.NewHandler(decider, dl, res, certs, outbound.Options{Flows: a.obs.flows, Go: a.workers.Go}, m, log.With("component", "outbound"))
	if err != nil {
		return nil, err
	}
	a.inbound, err = inbound.New(inbound.Config{TrustDomain: cfg.TrustDomain, ControlNamespace: cfg.ControlNamespace, Authorizer: a.enforcer, Flows: a.obs.flows, Go: a.workers.Go},
		a.registry, view, certs, a.stackRef, m, log.With("component", "inbound"))
	if err != nil {
		return nil, err
	}
	if cfg.ReleaseOnExit == release.DaemonSetDeleted {
		a.release, err = release.NewWatcher(client, cfg.PodNamespace, cfg.PodName, log.With("component", "release"))
		if err != nil {
			return nil, err
		}
	}
	return a, nil
}

// stackRef lets the parts built in New use the netstack that Run creates
// (it needs the host TUN, a device Run owns). Calls before Run fail.
type stackRef struct {
	st *netstack.Stack // set once by Run before any caller can reach it
}

func (r *stackRef) AttachTUN(cfg netstack.NICConfig) (netstack.NICID, error) {
	if r.st == nil {
		return 0, netstack.ErrClosed
	}
	return r.st.AttachTUN(cfg)
}

func (r *stackRef) DetachNIC(id netstack.NICID) error {
	if r.st == nil {
		return netstack.ErrClosed
	}
	return r.st.DetachNIC(id)
}

func (r *stackRef) DialTCP(ctx context.Context, id netstack.NICID, src, dst netip.AddrPort) (net.Conn, error) {
	if r.st == nil {
		return nil, netstack.ErrClosed
	}
	return r.st.DialTCP(ctx, id, src, dst)
}

// Run starts everything and blocks until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	// Deferred first, so it runs last: once the stack, the sessions and
	// the splices have stopped, their tasks have returned.
	defer a.closeWorkers()
	if err := rbac.Check(ctx, a.client, RequiredPermissions(a.cfg.ReleaseOnExit, a.cfg.PodNamespace)); err != nil {
		return fmt.Errorf("agent start-up: %w", err)
	}
	if a.release != nil {
		// The watch outlives ctx: the exit decision reads it after the
		// rest has stopped (a deletion seen at the last moment counts).
		wctx, wcancel := context.WithCancel(context.Background())
		wdone := make(chan struct{})
		go func() { // RoutineReleaseWatch: ends when Run returns
			defer close(wdone)
			_ = a.release.Run(wctx)
		}()
		defer func() { wcancel(); <-wdone }()
	}
	a.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.client.CoreV1().Events("")})
	defer a.broadcaster.Shutdown()

	// Passthrough packets leave through a TUN in the node's namespace, as
	// if they had arrived from the pod's side; the kernel routes them on.
	hostFD, err := tun.CreateInNetns("/proc/self/ns/net", a.cfg.HostTUN, a.cfg.TUNMTU)
	if err != nil {
		return fmt.Errorf("create host tun %s: %w", a.cfg.HostTUN, err)
	}
	defer func() { _ = tun.Delete("/proc/self/ns/net", a.cfg.HostTUN) }()
	defer func() { _ = unix.Close(hostFD) }()
	for _, k := range []string{"all", a.cfg.HostTUN} {
		if err := os.WriteFile(tun.SysctlDir+"/net/ipv4/conf/"+k+"/rp_filter", []byte("0"), 0o644); err != nil {
			return fmt.Errorf("rp_filter off on %s: %w", k, err)
		}
	}
	if err := a.wgAttachHost(hostFD); err != nil {
		return err
	}
	st, err := netstack.New(netstack.Options{
		Handler:     a.outbound,
		Passthrough: netstack.FDWriter(hostFD),
		UnderlayMTU: a.cfg.UnderlayMTU,
		// Plaintext connections into pods, for edges and tap (observe.go).
		OnPassthroughSYNACK: a.passthroughSYNACK,
		Go:                  a.workers.Go,
	}, a.log.With("component", "netstack"))
	if err != nil {
		return fmt.Errorf("start netstack: %w", err)
	}
	a.stackRef.st = st
	defer st.Close()
	collector := nodemetrics.StackCollector{Stats: st.Stats}
	if err := a.reg.Register(collector); err != nil {
		return fmt.Errorf("register netstack metrics: %w", err)
	}
	defer a.reg.Unregister(collector)

	meshLn, err := net.Listen("tcp", net.JoinHostPort(a.cfg.NodeIP.String(), strconv.Itoa(a.cfg.MeshPort)))
	if err != nil {
		return fmt.Errorf("listen for the mesh: %w", err)
	}
	meshLn = a.wgUnderlay(meshLn)
	cniLn, err := cniapi.Listen(a.cfg.CNISocket)
	if err != nil {
		return fmt.Errorf("listen for the CNI plugin: %w", err)
	}
	cniSrv := &http.Server{Handler: cniapi.NewHandler(a.cni, a.log.With("component", "cni")), ReadHeaderTimeout: 10 * time.Second}
	adminSrv := &http.Server{Addr: a.cfg.AdminAddr, ReadHeaderTimeout: 10 * time.Second, Handler: admin.Handler(admin.Config{
		Gatherer: a.reg,
		Ready: []admin.Check{{Name: "informers", Fn: func() error {
			if !a.gate.Synced() {
				return errors.New("not synced")
			}
			return nil
		}}, {Name: "mesh listener", Fn: a.inbound.Ready}, {Name: "certificates", Fn: a.certificatesReady}, {Name: "wireguard", Fn: a.wgReady}},
		Version: Version, Node: a.cfg.NodeName, CNIConfDir: a.cfg.CNIConfDir,
		Verify: a.certs.VerifyHandler(), VerifyPath: workload.VerifyPath,
	})}

	// Pods attached by a previous run come back before new ones are taken.
	a.cni.Restore(ctx)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.certs.Run(gctx) })
	g.Go(func() error { return a.resolver.Run(gctx) })
	g.Go(func() error { return a.view.Run(gctx) })
	g.Go(func() error { return a.enforcer.policies.Run(gctx) })
	g.Go(func() error { return a.cni.Reconcile(gctx, time.Second) })
	g.Go(func() error { return a.inbound.Serve(gctx, meshLn) })
	g.Go(func() error { return a.dialer.Run(gctx) })
	g.Go(func() error { return a.serveObservability(gctx, st) })
	if err := a.wgRun(g, gctx); err != nil {
		return err
	}
	g.Go(func() error { return serveHTTP(gctx, cniSrv, cniLn) })
	g.Go(func() error {
		ln, err := net.Listen("tcp", a.cfg.AdminAddr)
		if err != nil {
			return fmt.Errorf("listen admin: %w", err)
		}
		return serveHTTP(gctx, adminSrv, ln)
	})
	if a.cfg.DebugAddr != "" {
		debugSrv := &http.Server{Handler: debugHandler(a.cfg.DebugHandlers), ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error {
			ln, err := net.Listen("tcp", a.cfg.DebugAddr)
			if err != nil {
				return fmt.Errorf("listen debug: %w", err)
			}
			return serveHTTP(gctx, debugSrv, ln)
		})
	}
	a.log.Info("agent running", "node", a.cfg.NodeName, "mesh", meshLn.Addr().String(), "cni_socket", a.cfg.CNISocket)
	err = g.Wait()
	a.exit()
	return err
}

// closeWorkers stops the worker pool. Its busy workers run tasks of parts
// that Run has stopped already; one still running after a few seconds is
// a task that did not stop, which is logged rather than hanging the exit
// (the process ends after Run).
func (a *Agent) closeWorkers() {
	done := make(chan struct{})
	go func() { // RoutineCloseWorkers: ends when the pool's workers have
		defer close(done)
		a.workers.Close()
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		a.log.Warn("worker pool: tasks still running at exit", "busy", a.workers.Stats().Busy)
	}
}

// exit leaves the node's pods for the next agent (restart, rollout), or,
// when tunmesh is being uninstalled, releases them from the mesh so they
// keep talking on the primary CNI's path. Only a deletion the API reported
// releases them: when the agent cannot tell, they stay attached (and fail
// closed until an agent comes back), never released to plaintext on a
// guess.
func (a *Agent) exit() {
	if a.release == nil {
		a.cni.ReleaseAll()
		a.log.Info("agent stopping: pods stay attached for the next agent", "release_on_exit", string(a.cfg.ReleaseOnExit))
		return
	}
	release, why := a.release.Decide(context.Background())
	if !release {
		a.cni.ReleaseAll()
		a.log.Info("agent stopping: pods stay attached for the next agent", "reason", why)
		return
	}
	a.log.Warn("tunmesh is being uninstalled: releasing every pod of the node from the mesh (plaintext from now on)", "reason", why)
	a.wgRelease()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	n, err := a.cni.ReleaseFromMesh(ctx)
	if err != nil {
		a.log.Error("pods not all released from the mesh", "released", n, "err", err)
		return
	}
	a.log.Info("pods released from the mesh", "released", n)
}

// certificatesReady fails while a local pod's identity has no certificate
// and the last attempt to get one failed (the identity service is
// unreachable or refuses): meshed flows of that pod would be refused.
func (a *Agent) certificatesReady() error {
	for _, id := range a.registry.Identities() {
		if _, ok := a.certs.Expiry(id); ok {
			continue
		}
		if err := a.certs.LastError(id); err != nil {
			return fmt.Errorf("no certificate for %s: %w", id, err)
		}
	}
	return nil
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
