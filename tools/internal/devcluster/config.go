// Package devcluster runs the local multi-node Kubernetes cluster used by
// `make demo` and the end-to-end tests: a real etcd, kube-apiserver and
// kube-controller-manager in a control-plane network namespace, nodes as
// network namespaces joined by an underlay bridge with host-gw routes, and a
// kubelet stand-in plus scheduler stand-in per cluster. Every namespace the
// cluster makes carries the cluster name as prefix so that Down can remove
// all of it, also after a crash, without touching anything else.
package devcluster

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
)

// Fixed addressing. Every address lives inside namespaces the cluster owns,
// so two clusters with different names never collide.
var (
	underlayPrefix = netip.MustParsePrefix("10.250.0.0/24")
	controlPlaneIP = netip.MustParseAddr("10.250.0.2")
	// ClusterCIDR holds every node's pod CIDR (10.244.<i>.0/24 for node i).
	ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	// ServiceCIDR is the kube-apiserver's --service-cluster-ip-range.
	ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
)

const (
	apiServerPort = 6443
	etcdPort      = 2379
	maxNodes      = 200
)

// Defaults for Config fields left empty.
const (
	DefaultName      = "tmdev"
	DefaultRoot      = "/var/lib/tunmesh-dev"
	DefaultCNIBinDir = "/usr/lib/cni"
	DefaultEtcd      = "/usr/bin/etcd"
)

// ErrNotRunning is returned when a cluster command needs a running cluster.
var ErrNotRunning = errors.New("cluster is not running")

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,9}$`)

// Config describes one local cluster.
type Config struct {
	Name       string // prefix of everything the cluster makes; [a-z][a-z0-9]{0,9}
	Nodes      int    // number of nodes, default 2
	Root       string // state root; the cluster lives in Root/Name
	KubeBinDir string // kube-apiserver, kube-controller-manager, kubectl
	BinDir     string // tunmesh binaries (tunmesh-workload); containers' commands resolve here first
	CNIBinDir  string // reference CNI plugins
	Etcd       string // etcd binary
	// Mesh runs tunmesh on the cluster: tunmesh-identity, an agent per
	// node and tunmesh-cni chained after the bridge plugin. Ignored with
	// RealNodes (there tunmesh is installed like on any cluster:
	// `tunmeshctl install | kubectl apply -f -`).
	Mesh bool
	// RealNodes runs every node as a real kubelet with containerd and runc
	// (see tools/internal/realnode) and schedules with the real
	// kube-scheduler, instead of the kubelet and scheduler stand-ins.
	RealNodes bool
	// ImageDir holds the OCI archives (make images) imported into every
	// real node's containerd; default BinDir/images.
	ImageDir string
	// Transport is the agents' transport between nodes: "tcp" (default)
	// or "wireguard"; EncryptAll (wireguard only) carries all cross-node
	// pod traffic through WireGuard (tunmesh-node --transport,
	// --encrypt-all; docs/wireguard.md).
	Transport  string
	EncryptAll bool
	// WireGuardMTU, if set, is the agents' --wireguard-mtu (the overlay's
	// MTU for the mesh tunnels).
	WireGuardMTU int
	// WireGuardRequired (wireguard only) is the agents'
	// --wireguard-required (strict mode).
	WireGuardRequired bool
}

// WithDefaults fills empty fields and validates the result.
func (c Config) WithDefaults() (Config, error) {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.Nodes == 0 {
		c.Nodes = 2
	}
	if c.Root == "" {
		c.Root = DefaultRoot
	}
	if c.CNIBinDir == "" {
		c.CNIBinDir = DefaultCNIBinDir
	}
	if c.Etcd == "" {
		c.Etcd = DefaultEtcd
	}
	if c.BinDir == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("find own executable: %w", err)
		}
		c.BinDir = filepath.Dir(exe)
	}
	if c.ImageDir == "" {
		c.ImageDir = filepath.Join(c.BinDir, "images")
	}
	if c.RealNodes {
		c.Mesh = false
	}
	if c.Transport == "" {
		c.Transport = "tcp"
	}
	if c.Transport != "tcp" && c.Transport != "wireguard" {
		return c, fmt.Errorf("transport %q: must be tcp or wireguard", c.Transport)
	}
	if c.EncryptAll && c.Transport != "wireguard" {
		return c, errors.New("encrypt-all needs transport wireguard")
	}
	if c.WireGuardRequired && c.Transport != "wireguard" {
		return c, errors.New("wireguard-required needs transport wireguard")
	}
	if !nameRE.MatchString(c.Name) {
		return c, fmt.Errorf("cluster name %q: must match %s (it prefixes namespace names)", c.Name, nameRE)
	}
	if c.Nodes < 1 || c.Nodes > maxNodes {
		return c, fmt.Errorf("nodes %d: must be between 1 and %d", c.Nodes, maxNodes)
	}
	return c, nil
}

// Dir is the cluster's state directory.
func (c Config) Dir() string { return filepath.Join(c.Root, c.Name) }

func (c Config) path(elem ...string) string {
	return filepath.Join(append([]string{c.Dir()}, elem...)...)
}

// KubeconfigPath is the admin kubeconfig usable from the host (127.0.0.1).
func (c Config) KubeconfigPath() string { return c.path("kubeconfig") }

// Namespace names. The prefix "<name>-" marks everything the cluster owns.
func (c Config) nsPrefix() string          { return c.Name + "-" }
func (c Config) controlPlaneNS() string    { return c.Name + "-cp" }
func (c Config) underlayNS() string        { return c.Name + "-ul" }
func (c Config) nodeNS(node string) string { return c.Name + "-" + node }

// cgroupPrefix prefixes the cgroup root of every real node.
func (c Config) cgroupPrefix() string { return "tunmesh-" + c.Name + "-" }

// PodNetnsPrefix prefixes the netns of every pod (followed by the pod UID).
func (c Config) PodNetnsPrefix() string { return c.Name + "-pod-" }

// NodeSpec is the fixed layout of node i (1-based).
type NodeSpec struct {
	Name    string
	Netns   string
	IP      netip.Addr   // underlay address
	PodCIDR netip.Prefix // 10.244.<i>.0/24
}

func (c Config) nodeSpecs() []NodeSpec {
	specs := make([]NodeSpec, c.Nodes)
	for i := range specs {
		n := i + 1
		name := "node-" + strconv.Itoa(n)
		specs[i] = NodeSpec{
			Name:    name,
			Netns:   c.nodeNS(name),
			IP:      netip.AddrFrom4([4]byte{10, 250, 0, byte(10 + n)}),
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(n), 0}), 24),
		}
	}
	return specs
}

// firstServiceIP is the ClusterIP of the "kubernetes" Service.
func firstServiceIP() netip.Addr { return ServiceCIDR.Addr().Next() }
