package devcluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
	"github.com/tunmesh/tunmesh/tools/internal/nsproc"
)

// The mesh in the local cluster: tunmesh-identity runs as a control-plane
// process; on every node a tunmesh-node agent runs in the node's
// namespace and tunmesh-cni-install puts tunmesh-cni into the node's CNI
// bin dir and conflist (chained after the bridge plugin), both supervised
// like the containers of a DaemonSet pod (restarted when they die). Each agent authenticates
// with a projected token bound to a placeholder agent Pod on its node
// (tunmesh/tunmesh-node-<node>), refreshed before it expires.
const (
	identityPort = 8443
	agentAdmin   = 4191
	// AgentDebugAddr is where every agent serves net/http/pprof, inside
	// its node's network namespace (loopback: reachable only from there),
	// so that benchmarks and people can profile a stand-in cluster's agents.
	AgentDebugAddr = "127.0.0.1:6060"
	// AgentEnvPrefix: TUNMESH_AGENT_GODEBUG, TUNMESH_AGENT_GOGC,
	// TUNMESH_AGENT_GOMEMLIMIT and TUNMESH_AGENT_GOMAXPROCS, when set in the
	// environment of whoever boots the cluster, become the agents' GODEBUG,
	// GOGC, GOMEMLIMIT and GOMAXPROCS (and only theirs, not the control
	// plane's): for example
	// TUNMESH_AGENT_GODEBUG=memprofilerate=4096 for heap profiles finer
	// than the default one sample per 512 KiB, or a GOMEMLIMIT to measure.
	AgentEnvPrefix = "TUNMESH_AGENT_"
	meshNS         = "tunmesh"
)

type mesh struct {
	cfg    Config
	client kubernetes.Interface
	cp     *controlPlane
	nodes  []NodeSpec
	log    func(string, ...any)

	mu         sync.Mutex // guards procs and installers
	procs      map[string]*nsproc.Process
	installers map[string]*nsproc.Process
}

func (c Config) meshBinaries() []string {
	return []string{"tunmesh-node", "tunmesh-identity", "tunmesh-cni", "tunmesh-cni-install"}
}

// startMesh installs and starts the mesh; the returned mesh's run keeps
// the agents alive until ctx ends.
func startMesh(ctx context.Context, cfg Config, client kubernetes.Interface, cp *controlPlane, nodes []NodeSpec, progress func(string, ...any)) (*mesh, error) {
	m := &mesh{cfg: cfg, client: client, cp: cp, nodes: nodes, log: progress, procs: map[string]*nsproc.Process{}, installers: map[string]*nsproc.Process{}}
	for _, b := range cfg.meshBinaries() {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, b)); err != nil {
			return nil, fmt.Errorf("mesh binary %s not in %s (run `make build`): %w", b, cfg.BinDir, ErrMissingPrerequisite)
		}
	}
	progress("installing the mesh: namespace, RBAC, identity issuer")
	for _, f := range deploy.Base {
		b, err := deploy.Manifests.ReadFile(f)
		if err != nil {
			return nil, err
		}
		if err := m.kubectl(ctx, b, "apply", "-f", "-"); err != nil {
			return nil, fmt.Errorf("apply %s: %w", f, err)
		}
	}
	if err := m.bootstrapIdentity(ctx); err != nil {
		return nil, err
	}
	progress("starting tunmesh-identity")
	if err := m.startIdentity(); err != nil {
		return nil, err
	}
	progress("starting an agent on each node")
	for _, n := range nodes {
		if err := m.placeholderPod(ctx, n); err != nil {
			return nil, err
		}
		if err := m.refreshToken(ctx, n); err != nil {
			return nil, err
		}
		if err := m.startAgent(n); err != nil {
			return nil, err
		}
	}
	for _, n := range nodes {
		if err := m.waitAgentReady(ctx, n); err != nil {
			return nil, err
		}
	}
	progress("installing tunmesh-cni on each node (tunmesh-cni-install)")
	for _, n := range nodes {
		if err := m.startInstaller(n); err != nil {
			return nil, err
		}
	}
	for _, n := range nodes {
		if err := m.waitInstalled(ctx, n); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *mesh) dir(elem ...string) string { return m.cfg.path(append([]string{"mesh"}, elem...)...) }

func (m *mesh) kubectl(ctx context.Context, stdin []byte, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(m.cfg.KubeBinDir, "kubectl"), append([]string{"--kubeconfig", m.cfg.KubeconfigPath()}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// bootstrapIdentity makes a development trust anchor and issuer and stores
// them as the issuer Secret (cert-manager layout) and as files.
func (m *mesh) bootstrapIdentity(ctx context.Context) error {
	now := time.Now()
	root, rootKey, err := ca.NewRoot("root.tunmesh.cluster.local", 365*24*time.Hour, now)
	if err != nil {
		return err
	}
	iss, issKey, err := ca.NewIntermediate(root, rootKey, "identity.tunmesh.cluster.local", 180*24*time.Hour, now)
	if err != nil {
		return err
	}
	keyPEM, err := ca.EncodeKeyPEM(issKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{"ca.crt": ca.EncodeCertPEM(root), "tls.crt": ca.EncodeCertPEM(iss), "tls.key": keyPEM}
	if err := os.MkdirAll(m.dir("identity"), 0o700); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(m.dir("identity", name), b, 0o600); err != nil {
			return err
		}
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-identity-issuer", Namespace: meshNS},
		Type:       corev1.SecretTypeTLS,
		Data:       files,
	}
	if _, err := m.client.CoreV1().Secrets(meshNS).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create issuer secret: %w", err)
	}
	return nil
}

// saKubeconfig writes a kubeconfig with which a component acts as its
// ServiceAccount in the mesh namespace (and so has that account's RBAC).
func (m *mesh) saKubeconfig(path, sa string) error {
	return m.cp.pki.writeKubeconfig(path, m.cp.apiURL(), adminUser, "system:serviceaccount:"+meshNS+":"+sa)
}

func (m *mesh) startIdentity() error {
	kc := m.dir("identity", "kubeconfig")
	if err := m.saKubeconfig(kc, "tunmesh-identity"); err != nil {
		return err
	}
	p, err := nsproc.Start(nsproc.Spec{
		Netns: m.cfg.controlPlaneNS(),
		Path:  filepath.Join(m.cfg.BinDir, "tunmesh-identity"),
		Args: []string{
			"--addr", net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(identityPort)),
			"--metrics-addr", "127.0.0.1:9990",
			"--issuer-dir", m.dir("identity"),
			"--kubeconfig", kc,
		},
		Log: m.cfg.path("logs", "tunmesh-identity.log"),
	})
	if err != nil {
		return err
	}
	m.cp.procs = append(m.cp.procs, &named{name: "tunmesh-identity", Process: p})
	return nil
}

// HoldFile, created in a node's mesh directory (<root>/<name>/mesh/<node>/),
// keeps the supervisor from restarting that node's agent until it is
// removed: tests use it to hold an agent down.
const HoldFile = "hold"

func agentPodName(n NodeSpec) string { return "tunmesh-node-" + n.Name }

// placeholderPod creates the agent Pod object of a node (its container
// only sleeps: the agent itself runs as a node process) so that the
// agent's token can be bound to a pod on that node, as in a DaemonSet.
func (m *mesh) placeholderPod(ctx context.Context, n NodeSpec) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: agentPodName(n), Namespace: meshNS, Labels: map[string]string{"app": "tunmesh-node"}},
		Spec: corev1.PodSpec{
			NodeName:           n.Name,
			HostNetwork:        true, // as the agent DaemonSet: its IP is the node's
			ServiceAccountName: "tunmesh-node",
			Containers:         []corev1.Container{{Name: "placeholder", Image: "tunmesh-workload", Args: []string{"sleep"}}},
		},
	}
	if _, err := m.client.CoreV1().Pods(meshNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create agent pod for %s: %w", n.Name, err)
	}
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		p, err := m.client.CoreV1().Pods(meshNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err == nil && p.Status.Phase == corev1.PodRunning {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("agent pod of %s not running", n.Name)
}

// refreshToken writes a 1 h token for the agent of n, bound to its pod.
func (m *mesh) refreshToken(ctx context.Context, n NodeSpec) error {
	pod, err := m.client.CoreV1().Pods(meshNS).Get(ctx, agentPodName(n), metav1.GetOptions{})
	if err != nil {
		return err
	}
	exp := int64(3600)
	tr, err := m.client.CoreV1().ServiceAccounts(meshNS).CreateToken(ctx, "tunmesh-node", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         []string{"tunmesh-identity"},
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for agent of %s: %w", n.Name, err)
	}
	if err := os.MkdirAll(m.dir(n.Name), 0o700); err != nil {
		return err
	}
	tmp := m.dir(n.Name, "token.tmp")
	if err := os.WriteFile(tmp, []byte(tr.Status.Token), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, m.dir(n.Name, "token"))
}

// nodeCNIBinDir is a node's /opt/cni/bin: the installer copies tunmesh-cni
// there; the reference plugins stay in CNIBinDir.
func (c Config) nodeCNIBinDir(node string) string { return c.path("nodes", node, "cni", "bin") }

// CNISocket is where the agent of a node listens for its CNI plugin.
func (c Config) cniSocket(node string) string { return c.path("mesh", node, "cni.sock") }

func (m *mesh) startAgent(n NodeSpec) error {
	kc := m.dir(n.Name, "kubeconfig")
	if err := m.agentKubeconfig(kc, n); err != nil {
		return err
	}
	env := agentEnv(os.Environ())
	p, err := nsproc.Start(nsproc.Spec{
		Netns: n.Netns,
		Env:   env,
		Path:  filepath.Join(m.cfg.BinDir, "tunmesh-node"),
		Args: append([]string{
			"--node-name", n.Name,
			"--node-ip", n.IP.String(),
			"--cluster-cidrs", ClusterCIDR.String() + "," + ServiceCIDR.String(),
			"--cni-socket", m.cfg.cniSocket(n.Name),
			"--admin-addr", net.JoinHostPort(n.IP.String(), strconv.Itoa(agentAdmin)),
			"--kubeconfig", kc,
			"--identity-url", "https://" + net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(identityPort)),
			"--trust-anchors", m.dir("identity", "ca.crt"),
			"--token-file", m.dir(n.Name, "token"),
			"--state-dir", m.dir(n.Name, "state"),
			"--debug-addr", AgentDebugAddr,
			// The node's own conflist, which /status reports (check --proxy).
			"--cni-conf-dir", m.cfg.path("nodes", n.Name, "cni", "net.d"),
			"--transport", m.cfg.Transport,
			"--encrypt-all=" + strconv.FormatBool(m.cfg.EncryptAll),
		}, m.wireGuardArgs()...),
		Log: m.cfg.path("logs", "tunmesh-node-"+n.Name+".log"),
	})
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.procs[n.Name] = p
	m.mu.Unlock()
	return nil
}

// agentEnv is the agents' environment: the caller's (nil) unless it sets
// one of the AgentEnvPrefix variables, which are then added without it.
func agentEnv(caller []string) []string {
	var extra []string
	for _, kv := range caller {
		k, v, _ := strings.Cut(kv, "=")
		if name, ok := strings.CutPrefix(k, AgentEnvPrefix); ok && slices.Contains([]string{"GODEBUG", "GOGC", "GOMEMLIMIT", "GOMAXPROCS"}, name) {
			extra = append(extra, name+"="+v)
		}
	}
	if extra == nil {
		return nil
	}
	return append(slices.Clip(caller), extra...)
}

// startInstaller runs tunmesh-cni-install for a node, with the node's own
// CNI bin and conf dirs (the nodes share one filesystem).
func (m *mesh) startInstaller(n NodeSpec) error {
	p, err := nsproc.Start(nsproc.Spec{
		Path: filepath.Join(m.cfg.BinDir, "tunmesh-cni-install"),
		Args: []string{
			"-bin-source", filepath.Join(m.cfg.BinDir, "tunmesh-cni"),
			"-bin-dir", m.cfg.nodeCNIBinDir(n.Name),
			"-conf-dir", m.cfg.path("nodes", n.Name, "cni", "net.d"),
			"-socket", m.cfg.cniSocket(n.Name),
			"-log-file", m.cfg.path("logs", "tunmesh-cni-"+n.Name+".log"),
		},
		Log: m.cfg.path("logs", "tunmesh-cni-install-"+n.Name+".log"),
	})
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.installers[n.Name] = p
	m.mu.Unlock()
	return nil
}

// waitInstalled waits until the node's conflist chains tunmesh-cni.
func (m *mesh) waitInstalled(ctx context.Context, n NodeSpec) error {
	conf := filepath.Join(m.cfg.path("nodes", n.Name, "cni", "net.d"), "10-bridge.conflist")
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(conf); err == nil && bytes.Contains(b, []byte(`"tunmesh-cni"`)) {
			if _, err := os.Stat(filepath.Join(m.cfg.nodeCNIBinDir(n.Name), "tunmesh-cni")); err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("tunmesh-cni not installed on %s after 30s (log: %s)", n.Name, m.cfg.path("logs", "tunmesh-cni-install-"+n.Name+".log"))
}

func (m *mesh) waitAgentReady(ctx context.Context, n NodeSpec) error {
	url := "http://" + net.JoinHostPort(n.IP.String(), strconv.Itoa(agentAdmin)) + "/ready"
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: namedns.Dialer(n.Netns),
	}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		m.mu.Lock()
		p := m.procs[n.Name]
		m.mu.Unlock()
		select {
		case <-p.Done():
			return fmt.Errorf("agent on %s exited with code %d (log: %s)", n.Name, p.ExitCode(), m.cfg.path("logs", "tunmesh-node-"+n.Name+".log"))
		default:
		}
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("agent on %s not ready after a minute", n.Name)
}

// run restarts agents that die (as the kubelet restarts a DaemonSet pod)
// and refreshes their tokens, until ctx ends; then it stops them.
func (m *mesh) run(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	lastToken := time.Now()
	for {
		select {
		case <-ctx.Done():
			m.mu.Lock()
			for _, p := range m.installers { // uninstall from the conflists first
				p.Stop(10 * time.Second)
			}
			for _, p := range m.procs {
				p.Stop(5 * time.Second)
			}
			m.mu.Unlock()
			return nil
		case <-t.C:
		}
		if time.Since(lastToken) > 30*time.Minute {
			for _, n := range m.nodes {
				if err := m.refreshToken(ctx, n); err != nil {
					m.log("refresh agent token on %s: %v", n.Name, err)
				}
			}
			lastToken = time.Now()
		}
		for _, n := range m.nodes {
			m.mu.Lock()
			p := m.procs[n.Name]
			m.mu.Unlock()
			if _, err := os.Stat(m.dir(n.Name, HoldFile)); err == nil {
				continue // held down on purpose (tests of an agent outage)
			}
			select {
			case <-p.Done():
				m.log("agent on %s exited with code %d; restarting", n.Name, p.ExitCode())
				if err := m.startAgent(n); err != nil {
					m.log("restart agent on %s: %v", n.Name, err)
				}
			default:
			}
			m.mu.Lock()
			inst := m.installers[n.Name]
			m.mu.Unlock()
			select {
			case <-inst.Done():
				m.log("tunmesh-cni-install on %s exited with code %d; restarting", n.Name, inst.ExitCode())
				if err := m.startInstaller(n); err != nil {
					m.log("restart tunmesh-cni-install on %s: %v", n.Name, err)
				}
			default:
			}
		}
	}
}

// wireGuardArgs are the agent flags of the WireGuard transport beyond
// --transport and --encrypt-all.
func (m *mesh) wireGuardArgs() []string {
	var args []string
	if m.cfg.WireGuardMTU != 0 {
		args = append(args, "--wireguard-mtu", strconv.Itoa(m.cfg.WireGuardMTU))
	}
	if m.cfg.WireGuardRequired {
		args = append(args, "--wireguard-required")
	}
	return args
}
