package realnode

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"text/template"
)

// The paths a node's processes see. containerd, the kubelet and every
// hostPath volume use the standard locations; the node's mount namespace
// binds a per-node directory over each (see Mounts).
const (
	ContainerdSocket = "/run/containerd/containerd.sock"
	CNIConfDir       = "/etc/cni/net.d"
	CNIBinDir        = "/opt/cni/bin"
	KubeletRootDir   = "/var/lib/kubelet"
)

// Mounts are the host paths a real node makes its own: inside the node's
// mount namespace a per-node directory (Dir/host/<path>, or the CNI dirs the
// cluster writes) is bind-mounted over each, so that containerd, the kubelet
// and the hostPath volumes of pods (a DaemonSet's CNI dirs, the agent's
// /var/run/tunmesh and /var/lib/tunmesh) see per-node paths while the host
// stays untouched. Writes that containerd and the kubelet make to fixed
// paths whatever their configuration (/run/containerd/runc/k8s.io,
// /run/containerd/s, /var/lib/cni/results, /var/lib/kubelet/device-plugins,
// /var/log/pods) land in the node's directory as well.
var Mounts = []string{
	CNIConfDir,
	CNIBinDir,
	"/run/containerd",
	"/var/lib/containerd",
	"/run/tunmesh", // /var/run is a symlink to /run
	"/var/lib/tunmesh",
	"/var/lib/cni",
	KubeletRootDir,
	"/var/log/pods",
	"/var/log/containers",
}

// HostSysctls are the host-wide settings the kubelet changes at start-up
// (it sets what it considers kernel defaults for a node); the cluster saves
// them before the first kubelet starts and restores them on teardown.
var HostSysctls = []string{"vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops"}

type containerdParams struct {
	Socket       string
	SandboxImage string
	CNIConfDir   string
	CNIBinDir    string
}

// containerd 1.6 configuration (version 2). Paths are the standard ones; the
// node's mount namespace makes them per-node.
//   - restrict_oom_score_adj: without CAP_SYS_RESOURCE (this kind of VM) runc
//     cannot lower a container's oom_score_adj below containerd's own.
//   - netns_mounts_under_state_dir: pod network namespaces are bind-mounted
//     under /run/containerd (per node) rather than the host's /run/netns.
//   - enable_unprivileged_ports/icmp: containerd 2's defaults; non-root
//     containers (our images run as 65532) may bind ports below 1024.
//   - SystemdCgroup = false: PID 1 is not systemd; the kubelet uses cgroupfs.
//   - the "opt" plugin is disabled: it would create /opt/containerd.
var containerdTmpl = template.Must(template.New("containerd").Parse(`version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{{.Socket}}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{{.SandboxImage}}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{{.CNIBinDir}}"
    conf_dir = "{{.CNIConfDir}}"
    max_conf_num = 1
`))

// ContainerdConfig renders the node's containerd config.toml.
func ContainerdConfig(sandboxImage string) (string, error) {
	if sandboxImage == "" {
		return "", fmt.Errorf("containerd config: %w", errors.New("no sandbox image"))
	}
	var b bytes.Buffer
	err := containerdTmpl.Execute(&b, containerdParams{Socket: ContainerdSocket, SandboxImage: sandboxImage, CNIConfDir: CNIConfDir, CNIBinDir: CNIBinDir})
	return b.String(), err
}

type kubeletParams struct {
	Address    string
	CgroupRoot string
	ClientCA   string
	Socket     string
}

// Kubelet configuration for this kind of machine (cgroup v1 without
// systemd, no swap accounting, root without CAP_SYS_RESOURCE):
//   - cgroupRoot per node, so several real kubelets share the host and
//     teardown removes exactly one tree;
//   - authentication by the cluster CA (the API server's kubelet client
//     certificate) and webhook tokens, authorization by the API server:
//     kubectl logs/exec work, anonymous requests do not;
//   - no eviction and no image GC: the images are imported, never pulled,
//     and a busy shared disk must not evict test pods;
//   - no read-only port, no DNS (the local cluster has none).
var kubeletTmpl = template.Must(template.New("kubelet").Parse(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {{.Address}}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: {{.CgroupRoot}}
cgroupsPerQOS: true
containerRuntimeEndpoint: unix://{{.Socket}}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {{.ClientCA}}
authorization:
  mode: Webhook
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
serializeImagePulls: false
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
registerNode: true
maxPods: 110
nodeStatusReportFrequency: 10s
shutdownGracePeriod: 0s
`))

// KubeletConfig renders the node's KubeletConfiguration.
func KubeletConfig(address netip.Addr, cgroupRoot, clientCA string) (string, error) {
	if !address.IsValid() || cgroupRoot == "" || clientCA == "" {
		return "", fmt.Errorf("kubelet config: address, cgroup root and client CA are required")
	}
	var b bytes.Buffer
	err := kubeletTmpl.Execute(&b, kubeletParams{Address: address.String(), CgroupRoot: cgroupRoot, ClientCA: clientCA, Socket: ContainerdSocket})
	return b.String(), err
}
