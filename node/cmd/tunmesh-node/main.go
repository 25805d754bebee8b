// Command tunmesh-node is tunmesh's per-node agent (see package agent).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/netstack/tun"
	"github.com/tunmesh/tunmesh/node/agent"
	"github.com/tunmesh/tunmesh/node/release"
	"github.com/tunmesh/tunmesh/node/resolve"
)

type config struct {
	agent       agent.Config
	nodeIP      string
	cluster     string
	kubeconfig  string
	identityURL string
	anchorsFile string
	tokenFile   string
	logLevel    string
	release     string
	procs       string
}

func main() {
	var cfg config
	var httpMetrics bool
	fs := flag.NewFlagSet("tunmesh-node", flag.ExitOnError)
	fs.StringVar(&cfg.agent.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME)")
	fs.StringVar(&cfg.nodeIP, "node-ip", os.Getenv("NODE_IP"), "address peers dial on the mesh port (env NODE_IP)")
	fs.StringVar(&cfg.cluster, "cluster-cidrs", "", "comma-separated pod and service CIDRs routed into tm0")
	fs.StringVar(&cfg.agent.CNISocket, "cni-socket", "/var/run/tunmesh/cni.sock", "unix socket for the CNI plugin")
	fs.IntVar(&cfg.agent.MeshPort, "mesh-port", 4143, "mTLS tunnel port")
	fs.StringVar(&cfg.agent.AdminAddr, "admin-addr", "", "admin API: metrics, readiness, status, certificates (default <node-ip>:4191)")
	fs.BoolVar(&cfg.agent.TunnelV2Only, "tunnel-v2-only", false, "dial mesh tunnels with protocol v2 only (one TLS connection per pod connection; rollout escape hatch; the agent still accepts v2 and v3)")
	fs.StringVar(&cfg.agent.DebugAddr, "debug-addr", "", "serve net/http/pprof here (e.g. 127.0.0.1:6060; loopback addresses only; default off)")
	fs.StringVar(&cfg.agent.CNIConfDir, "cni-conf-dir", "/etc/cni/net.d", "the node's CNI configuration directory, checked (read only) for tunmesh-cni in /status")
	fs.StringVar(&cfg.agent.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fs.StringVar(&cfg.agent.ControlNamespace, "control-namespace", "tunmesh", "tunmesh's namespace")
	fs.StringVar(&cfg.agent.HostTUN, "host-tun", "tmhost", "TUN in the node namespace for passthrough packets")
	fs.IntVar(&cfg.agent.TUNMTU, "tun-mtu", 65520, "MTU of the pods' tm0")
	fs.IntVar(&cfg.agent.UnderlayMTU, "underlay-mtu", 1500, "MTU of the node network (MSS clamp of passthrough flows)")
	fs.StringVar(&cfg.agent.StateDir, "state-dir", "/var/lib/tunmesh", "state kept across agent restarts")
	fs.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig (empty: in-cluster)")
	fs.StringVar(&cfg.identityURL, "identity-url", "https://tunmesh-identity.tunmesh.svc:8443", "tunmesh-identity API; a <name>.<namespace>.svc host is reached through the Service's EndpointSlices (no cluster DNS or kube-proxy needed)")
	fs.StringVar(&cfg.anchorsFile, "trust-anchors", "/var/run/tunmesh/identity/ca.crt", "trust anchors (PEM)")
	fs.StringVar(&cfg.tokenFile, "token-file", "/var/run/secrets/tunmesh/tokens/tunmesh-identity", "projected ServiceAccount token, audience tunmesh-identity")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&cfg.release, "release-on-exit", string(release.Never), "when a stopping agent releases the node's pods from the mesh (tm0 and routes removed; plaintext on the primary CNI's path): never (keep them attached for the next agent), or daemonset-deleted (only when the API says the agent's DaemonSet is deleted or being deleted, i.e. uninstall; when it cannot tell, it keeps them)")
	fs.StringVar(&cfg.agent.PodName, "pod-name", os.Getenv("POD_NAME"), "the agent's own pod, for --release-on-exit=daemonset-deleted (env POD_NAME)")
	fs.StringVar(&cfg.agent.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "the agent's own pod's namespace (env POD_NAMESPACE; default --control-namespace)")
	fs.StringVar(&cfg.agent.WireGuard.Transport, "transport", agent.TransportTCP, "transport between nodes: tcp (mesh tunnels on the node address) or wireguard (over a userspace WireGuard overlay to nodes that publish a key; see docs/wireguard.md)")
	fs.IntVar(&cfg.agent.WireGuard.Port, "wireguard-port", 51820, "WireGuard UDP port on the node (transport wireguard)")
	fs.IntVar(&cfg.agent.WireGuard.MTU, "wireguard-mtu", 1420, "MTU of the WireGuard overlay that carries the mesh tunnels (transport wireguard); larger is faster, the underlay then fragments the datagrams; pod traffic (encrypt-all) is bounded by --underlay-mtu minus 80 instead")
	fs.BoolVar(&cfg.agent.WireGuard.EncryptAll, "encrypt-all", false, "transport wireguard: carry every packet a local pod sends to a pod on another WireGuard node (UDP, ICMP, non-meshed pods, skipped ports) through WireGuard")
	fs.BoolVar(&cfg.agent.WireGuard.Required, "wireguard-required", false, "transport wireguard, strict (once every node runs it): nodes that publish no WireGuard key are refused and, with --encrypt-all, their pods' traffic dropped, never sent on the underlay")
	fs.StringVar(&cfg.agent.Observe.Addr, "observe-addr", "", "observability API over TLS: capture, tap, edges, each call authenticated (client certificate or TokenReview of a tunmesh.io/observe token) and authorized (SubjectAccessReview) (default <node-ip>:4192; see docs/observability.md)")
	fs.StringVar(&cfg.agent.Observe.ClientCAFile, "client-ca-file", "", "CAs whose client certificates authenticate observability API callers (default: the cluster's client CA from ConfigMap kube-system/extension-apiserver-authentication, re-read every minute); bearer tokens must carry the audience tunmesh.io/observe")
	fs.StringVar(&cfg.agent.Observe.CertFile, "observe-cert-file", "", "serving certificate of the observability API (default: self-signed at start, fingerprint logged)")
	fs.StringVar(&cfg.agent.Observe.KeyFile, "observe-key-file", "", "key of --observe-cert-file")
	fs.BoolVar(&httpMetrics, "http-metrics", true, "parse HTTP/1 in meshed connections for the HTTP metrics (off: only while someone taps)")
	fs.StringVar(&tun.SysctlDir, "proc-sys-dir", tun.SysctlDir, "sysctl tree for net.* writes (a container's /proc/sys is read-only: the DaemonSet mounts the host's /proc/sys/net elsewhere)")
	fs.StringVar(&cfg.procs, "procs", "auto", "Ps of the Go scheduler (GOMAXPROCS): auto (one while one is enough, all of them once it is saturated; see docs/performance.md), or a number; an explicit GOMAXPROCS in the environment wins over auto")
	_ = fs.Parse(os.Args[1:])
	cfg.agent.Observe.NoHTTPMetrics = !httpMetrics

	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "tunmesh-node: --log-level: %v\n", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, cfg, log)
	stop()
	if err != nil {
		log.Error("tunmesh-node failed", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, log *slog.Logger) error {
	ip, err := netip.ParseAddr(cfg.nodeIP)
	if err != nil {
		return fmt.Errorf("--node-ip %q: %w", cfg.nodeIP, err)
	}
	cfg.agent.NodeIP = ip
	if cfg.agent.ReleaseOnExit, err = release.ParseMode(cfg.release); err != nil {
		return fmt.Errorf("--release-on-exit: %w", err)
	}
	for _, s := range strings.Split(cfg.cluster, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("--cluster-cidrs %q: %w", cfg.cluster, err)
		}
		cfg.agent.Cluster = append(cfg.agent.Cluster, p)
	}
	anchorsPEM, err := os.ReadFile(cfg.anchorsFile)
	if err != nil {
		return fmt.Errorf("read trust anchors: %w", err)
	}
	anchors, err := ca.ParseAnchors(anchorsPEM)
	if err != nil {
		return err
	}
	var rc *rest.Config
	if cfg.kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	rc.UserAgent = "tunmesh-node/" + agent.Version + "/" + cfg.agent.NodeName
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	if cfg.agent.Dynamic, err = dynamic.NewForConfig(rc); err != nil {
		return err
	}
	identityServer := spiffe.ControlPlaneDNSName("tunmesh-identity", cfg.agent.ControlNamespace, cfg.agent.TrustDomain)
	res, err := resolve.New(client, log.With("component", "resolver"))
	if err != nil {
		return err
	}
	var dialer net.Dialer
	idClient, err := workload.NewClientWithDialer(cfg.identityURL, identityServer, anchors.Pool(), cfg.tokenFile, res.DialContext(dialer.DialContext))
	if err != nil {
		return err
	}
	defer idClient.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	procsCtx, stopProcs := context.WithCancel(ctx)
	defer stopProcs()
	waitProcs, procsDebug, err := startProcs(procsCtx, cfg.procs, reg, log)
	if err != nil {
		return err
	}
	cfg.agent.DebugHandlers = map[string]http.Handler{"/debug/procs": procsDebug}
	defer func() { stopProcs(); waitProcs() }()
	certs, err := workload.NewManager(workload.ManagerConfig{}, idClient, anchors.Pool(), reg, log.With("component", "certificates"))
	if err != nil {
		return err
	}
	a, err := agent.New(cfg.agent, client, res, certs, anchors.Pool(), reg, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
