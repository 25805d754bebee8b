package devcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sort"
	"strconv"

	"github.com/vishvananda/netlink"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/tools/internal/kubelet"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
	"github.com/tunmesh/tunmesh/tools/internal/realnode"
)

// node is what a node of the local cluster is: the kubelet stand-in
// (tools/internal/kubelet) or a real kubelet with containerd
// (tools/internal/realnode). Run blocks until ctx ends and leaves nothing
// behind.
type node interface {
	Run(ctx context.Context) error
}

var (
	_ node = (*kubelet.Kubelet)(nil)
	_ node = (*realnode.Node)(nil)
)

// newNode builds node n of the cluster.
func newNode(cfg Config, n NodeSpec, client kubernetes.Interface, p pki, host *realnode.Host, images []string, log *slog.Logger) (node, error) {
	if !cfg.RealNodes {
		return kubelet.New(kubeletConfig(cfg, n), client, log.With("component", "kubelet"))
	}
	kc := cfg.path("nodes", n.Name, "kubelet.kubeconfig")
	if err := p.writeKubeconfig(kc, "https://"+net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(apiServerPort)), nodeUser(n.Name), ""); err != nil {
		return nil, err
	}
	return realnode.New(realnode.Config{
		Name:       n.Name,
		Netns:      n.Netns,
		NodeIP:     n.IP,
		Dir:        cfg.path("nodes", n.Name, "real"),
		CNIConfDir: cfg.path("nodes", n.Name, "cni", "net.d"),
		CNIBinDir:  cfg.nodeCNIBinDir(n.Name),
		PluginDir:  cfg.CNIBinDir,
		KubeBinDir: cfg.KubeBinDir,
		Kubeconfig: kc,
		ClientCA:   p.caCert(),
		Images:     images,
		CgroupRoot: "/" + cfg.cgroupPrefix() + n.Name,
		LogDir:     cfg.path("logs"),
		Log:        log.With("component", "realnode"),
	}, host)
}

// realnodeHost is the machine-wide host state, with this cluster as user.
func (c Config) realnodeHost() *realnode.Host {
	return realnode.NewHost(realnode.DefaultHostDir, c.Dir())
}

// imageArchives lists the OCI archives in the image dir (make images).
func imageArchives(cfg Config) ([]string, error) {
	m, err := filepath.Glob(filepath.Join(cfg.ImageDir, "*.tar"))
	if err != nil {
		return nil, err
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("no image archives in %s (run `make images`): %w", cfg.ImageDir, ErrMissingPrerequisite)
	}
	sort.Strings(m)
	return m, nil
}

// realNodeClients are the client certificates a real-node cluster needs on
// top of the admin's and the controller-manager's.
func realNodeClients(cfg Config, nodes []NodeSpec) []clientIdentity {
	ids := []clientIdentity{{kubeletClientUser, ""}}
	if !cfg.RealNodes {
		return ids
	}
	ids = append(ids, clientIdentity{schedulerUser, ""})
	for _, n := range nodes {
		ids = append(ids, clientIdentity{nodeUser(n.Name), "system:nodes"})
	}
	return ids
}

// bindKubeletClient lets the API server's kubelet client certificate use
// the kubelet API (logs, exec, port-forward) under the kubelets' webhook
// authorization.
func bindKubeletClient(ctx context.Context, client kubernetes.Interface) error {
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-dev:apiserver-kubelet-client"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:kubelet-api-admin"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: kubeletClientUser}},
	}
	_, err := client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("bind the api server's kubelet client: %w", err)
	}
	return nil
}

// serveKubernetesService makes the "kubernetes" Service's ClusterIP
// (10.96.0.1:443) reach the API server without kube-proxy: the control-plane
// namespace holds that address on its loopback and forwards it to the API
// server, and every node routes it to the control plane. Pods and
// hostNetwork pods (whose in-cluster config is KUBERNETES_SERVICE_HOST)
// then reach the API server as on any cluster.
func serveKubernetesService(cfg Config, nodes []NodeSpec, log *slog.Logger) (*forwarder, error) {
	svc := firstServiceIP()
	if err := namedns.Do(cfg.controlPlaneNS(), func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: svc.AsSlice(), Mask: net.CIDRMask(32, 32)}})
	}); err != nil {
		return nil, fmt.Errorf("add %s to the control plane's loopback: %w", svc, err)
	}
	for _, n := range nodes {
		if err := namedns.Do(n.Netns, func() error {
			return netlink.RouteAdd(&netlink.Route{
				Dst: &net.IPNet{IP: svc.AsSlice(), Mask: net.CIDRMask(32, 32)},
				Gw:  controlPlaneIP.AsSlice(),
			})
		}); err != nil {
			return nil, fmt.Errorf("route %s on %s: %w", svc, n.Name, err)
		}
	}
	ln, err := namedns.Listen(cfg.controlPlaneNS(), "tcp", netip.AddrPortFrom(svc, 443).String())
	if err != nil {
		return nil, fmt.Errorf("listen on %s:443: %w", svc, err)
	}
	return &forwarder{ln: ln, netns: cfg.controlPlaneNS(), target: net.JoinHostPort(controlPlaneIP.String(), strconv.Itoa(apiServerPort)), log: log}, nil
}

// setPodCIDR gives a node registered by a real kubelet its pod CIDR (the
// controller-manager's node IPAM is off: the bridge CNI config holds the
// same fixed range). It is a no-op once set.
func setPodCIDR(ctx context.Context, client kubernetes.Interface, n NodeSpec) (bool, error) {
	node, err := client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if node.Spec.PodCIDR != "" {
		return true, nil
	}
	patch, _ := json.Marshal(map[string]any{"spec": map[string]any{"podCIDR": n.PodCIDR.String(), "podCIDRs": []string{n.PodCIDR.String()}}})
	if _, err := client.CoreV1().Nodes().Patch(ctx, n.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return false, fmt.Errorf("set pod CIDR of %s: %w", n.Name, err)
	}
	return true, nil
}

// sweepRealNodes removes what real nodes of the cluster left: processes,
// cgroups, mount namespaces, host sysctls and mount points.
func sweepRealNodes(cfg Config) error {
	files, err := filepath.Glob(cfg.path("nodes", "*", "real", "mntns"))
	if err != nil {
		return err
	}
	return realnode.Sweep(files, cfg.cgroupPrefix(), cfg.realnodeHost())
}

// ContainerdSocket is, on the host, the containerd socket of a real node.
func ContainerdSocket(cfg Config, node string) string {
	cfg, _ = cfg.WithDefaults()
	return cfg.path("nodes", node, "real", "host", realnode.ContainerdSocket)
}
