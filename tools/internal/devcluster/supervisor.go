package devcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/tools/internal/kubelet"
	"github.com/tunmesh/tunmesh/tools/internal/scheduler"
)

// State is what a running cluster records in state.json for the other
// commands (status, exec, kubeconfig) and for tests.
type State struct {
	Name          string      `json:"name"`
	SupervisorPID int         `json:"supervisorPID"`
	APIServer     string      `json:"apiServer"`     // host address (127.0.0.1:port)
	APIServerNode string      `json:"apiServerNode"` // address inside the cluster network
	Kubeconfig    string      `json:"kubeconfig"`
	Nodes         []NodeState `json:"nodes"`
	Mesh          bool        `json:"mesh"`
	RealNodes     bool        `json:"realNodes"`
	Transport     string      `json:"transport,omitempty"`
	EncryptAll    bool        `json:"encryptAll,omitempty"`
	Started       time.Time   `json:"started"`
	ReadyAfter    string      `json:"readyAfter"`
}

// NodeState describes one node of a running cluster.
type NodeState struct {
	Name    string `json:"name"`
	Netns   string `json:"netns"`
	IP      string `json:"ip"`
	PodCIDR string `json:"podCIDR"`
	CNIConf string `json:"cniConfDir"`
}

const (
	progressFile = "progress.log"
	stateFile    = "state.json"
	pidFile      = "supervisor.pid"
	// Lines the supervisor writes last to the progress file.
	progressReady  = "READY"
	progressFailed = "FAILED: "
)

// Supervise builds the cluster, runs it until ctx ends or a control-plane
// process dies, and then removes everything it made. It is the body of the
// detached `tunmeshctl dev supervise` process that `dev up` starts.
func Supervise(ctx context.Context, cfg Config, log *slog.Logger) error {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	start := time.Now()
	if err := os.MkdirAll(cfg.path("logs"), 0o755); err != nil {
		return fmt.Errorf("create cluster dir: %w", err)
	}
	pf, err := os.OpenFile(cfg.path(progressFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("open progress file: %w", err)
	}
	defer pf.Close()
	progress := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		fmt.Fprintf(pf, "%s\n", msg)
		log.Info(msg)
	}
	if err := os.WriteFile(cfg.path(pidFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("write pid file: %w", err)
	}

	cp := &controlPlane{cfg: cfg, pki: pki{dir: cfg.path("pki")}}
	// Teardown runs whatever happened: the caller's ctx may already be done.
	defer func() {
		cp.stop()
		if err := sweep(cfg); err != nil {
			log.Warn("sweep cluster", "err", err)
		}
	}()
	runErr := supervise(ctx, cfg, cp, log, progress, start)
	if runErr != nil && !errors.Is(runErr, context.Canceled) {
		fmt.Fprintf(pf, "%s%v\n", progressFailed, runErr)
		return runErr
	}
	return nil
}

func supervise(ctx context.Context, cfg Config, cp *controlPlane, log *slog.Logger, progress func(string, ...any), start time.Time) error {
	nodes := cfg.nodeSpecs()
	progress("creating certificates")
	hosts := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	ips := []net.IP{net.ParseIP("127.0.0.1"), controlPlaneIP.AsSlice(), firstServiceIP().AsSlice()}
	if err := cp.pki.generate(hosts, ips, realNodeClients(cfg, nodes)...); err != nil {
		return err
	}
	progress("creating network: underlay, control plane and %d node namespaces", len(nodes))
	if err := buildNetwork(cfg, nodes); err != nil {
		return err
	}
	for _, n := range nodes {
		if err := writeNodeCNIConfig(cfg, n); err != nil {
			return err
		}
	}
	if err := cp.start(ctx, progress); err != nil {
		return err
	}

	fwd, err := newForwarder(cfg.controlPlaneNS(), net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(apiServerPort)), log)
	if err != nil {
		return fmt.Errorf("listen for api server forwarding: %w", err)
	}
	if err := cp.pki.writeKubeconfig(cfg.KubeconfigPath(), "https://"+fwd.addr(), adminUser, ""); err != nil {
		return err
	}
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.KubeconfigPath())
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	restCfg.QPS, restCfg.Burst = 50, 100
	restCfg.UserAgent = "tunmesh-dev-supervisor"
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("create client: %w", err)
	}

	var images []string
	if cfg.RealNodes {
		if images, err = imageArchives(cfg); err != nil {
			return err
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { fwd.run(gctx); return nil })
	if cfg.RealNodes {
		svc, err := serveKubernetesService(cfg, nodes, log)
		if err != nil {
			cancel()
			_ = g.Wait()
			return err
		}
		g.Go(func() error { svc.run(gctx); return nil })
	} else {
		sched, err := scheduler.New(client, log)
		if err != nil {
			cancel()
			_ = g.Wait()
			return err
		}
		g.Go(func() error { return sched.Run(gctx) })
	}
	kind := "stand-in"
	if cfg.RealNodes {
		kind = "real (kubelet + containerd)"
	}
	progress("starting %d %s nodes", len(nodes), kind)
	host := cfg.realnodeHost()
	for _, n := range nodes {
		k, err := newNode(cfg, n, client, cp.pki, host, images, log)
		if err != nil {
			cancel()
			_ = g.Wait()
			return err
		}
		g.Go(func() error { return k.Run(gctx) })
	}
	g.Go(func() error {
		select {
		case msg := <-cp.exited():
			return errors.New(msg)
		case <-gctx.Done():
			return nil
		}
	})
	g.Go(func() error {
		if cfg.RealNodes {
			if err := bindKubeletClient(gctx, client); err != nil {
				return err
			}
		}
		if err := waitNodesReady(gctx, client, nodes, cfg.RealNodes); err != nil {
			return err
		}
		// Pods are refused until the controller-manager has made the
		// namespace's default ServiceAccount: ready means usable.
		if err := waitDefaultServiceAccount(gctx, client); err != nil {
			return err
		}
		if cfg.Mesh {
			m, err := startMesh(gctx, cfg, client, cp, nodes, progress)
			if err != nil {
				return fmt.Errorf("start the mesh: %w", err)
			}
			g.Go(func() error { return m.run(gctx) })
		}
		st := State{
			Name:          cfg.Name,
			SupervisorPID: os.Getpid(),
			APIServer:     fwd.addr(),
			APIServerNode: cp.apiURL(),
			Kubeconfig:    cfg.KubeconfigPath(),
			Mesh:          cfg.Mesh,
			RealNodes:     cfg.RealNodes,
			Transport:     cfg.Transport,
			EncryptAll:    cfg.EncryptAll,
			Started:       start,
			ReadyAfter:    time.Since(start).Round(100 * time.Millisecond).String(),
		}
		for _, n := range nodes {
			st.Nodes = append(st.Nodes, NodeState{Name: n.Name, Netns: n.Netns, IP: n.IP.String(), PodCIDR: n.PodCIDR.String(), CNIConf: cfg.path("nodes", n.Name, "cni", "net.d")})
		}
		b, _ := json.MarshalIndent(st, "", "  ")
		if err := os.WriteFile(cfg.path(stateFile), b, 0o644); err != nil {
			return fmt.Errorf("write state: %w", err)
		}
		progress("cluster %q ready in %s: %d nodes, kubeconfig %s", cfg.Name, st.ReadyAfter, len(nodes), cfg.KubeconfigPath())
		progress(progressReady)
		return nil
	})
	return g.Wait()
}

func kubeletConfig(cfg Config, n NodeSpec) kubelet.Config {
	dir := cfg.path("nodes", n.Name)
	return kubelet.Config{
		NodeName:       n.Name,
		Netns:          n.Netns,
		NodeIP:         n.IP,
		PodCIDR:        n.PodCIDR,
		PodNetnsPrefix: cfg.PodNetnsPrefix(),
		CNIConfDir:     filepath.Join(dir, "cni", "net.d"),
		CNIBinDirs:     []string{cfg.nodeCNIBinDir(n.Name), cfg.CNIBinDir},
		CNICacheDir:    filepath.Join(dir, "cni", "cache"),
		StateDir:       filepath.Join(dir, "kubelet"),
		BinDirs:        []string{cfg.BinDir},
		Version:        KubernetesVersion,
		ServiceHost:    firstServiceIP().String(),
	}
}

// writeNodeCNIConfig writes the node's primary CNI configuration: the
// reference bridge plugin with host-local IPAM over the node's pod CIDR (no
// ipMasq: pods reach each other across nodes through host-gw routes). With
// the mesh, tunmesh-cni-install chains tunmesh-cni into it later.
func writeNodeCNIConfig(cfg Config, n NodeSpec) error {
	dir := cfg.path("nodes", n.Name, "cni")
	if err := os.MkdirAll(filepath.Join(dir, "net.d"), 0o755); err != nil {
		return fmt.Errorf("create CNI dir for %s: %w", n.Name, err)
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "tunmesh-dev",
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      "cni0",
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": n.PodCIDR.String()}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": filepath.Join(dir, "ipam"),
				},
			},
		},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	p := filepath.Join(dir, "net.d", "10-bridge.conflist")
	if err := os.WriteFile(p+".tmp", b, 0o644); err != nil {
		return fmt.Errorf("write CNI config for %s: %w", n.Name, err)
	}
	if err := os.Rename(p+".tmp", p); err != nil {
		return fmt.Errorf("write CNI config for %s: %w", n.Name, err)
	}
	return nil
}

// waitNodesReady waits until every node reports Ready to the API server.
// Real nodes get their pod CIDR once their kubelet has registered them.
func waitNodesReady(ctx context.Context, client kubernetes.Interface, nodes []NodeSpec, real bool) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cidrSet := map[string]bool{}
	for {
		if real {
			for _, n := range nodes {
				if cidrSet[n.Name] {
					continue
				}
				ok, err := setPodCIDR(ctx, client, n)
				if err != nil {
					return err
				}
				cidrSet[n.Name] = ok
			}
		}
		list, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		ready := 0
		if err == nil {
			for _, n := range list.Items {
				for _, c := range n.Status.Conditions {
					if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
						ready++
					}
				}
			}
		}
		if ready >= len(nodes) && (!real || len(cidrSet) == len(nodes) && allTrue(cidrSet)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %d nodes ready (%d ready, last error %v): %w", len(nodes), ready, err, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func waitDefaultServiceAccount(ctx context.Context, client kubernetes.Interface) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		_, err := client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for the default service account: %w (last error %v)", ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ReadState reads the state of a running cluster.
func ReadState(cfg Config) (*State, error) {
	b, err := os.ReadFile(cfg.path(stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cluster %q: %w", cfg.Name, ErrNotRunning)
	}
	if err != nil {
		return nil, fmt.Errorf("read cluster state: %w", err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("parse cluster state: %w", err)
	}
	if !supervisorAlive(cfg) {
		return nil, fmt.Errorf("cluster %q: supervisor is gone (run `tunmeshctl dev down`): %w", cfg.Name, ErrNotRunning)
	}
	return &st, nil
}

func allTrue(m map[string]bool) bool {
	for _, v := range m {
		if !v {
			return false
		}
	}
	return true
}
