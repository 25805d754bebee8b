package kubelet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

const podIfName = "eth0"

// cniRuntime runs the node's CNI configuration through libcni, the way a
// container runtime does. Plugins execute inside the node's namespace (they
// create the node side of the pod network: the bridge, host routes).
type cniRuntime struct {
	confDir string
	cni     *libcni.CNIConfig
}

func newCNIRuntime(cfg Config) *cniRuntime {
	return &cniRuntime{
		confDir: cfg.CNIConfDir,
		cni:     libcni.NewCNIConfigWithCacheDir(cfg.CNIBinDirs, cfg.CNICacheDir, nodeExec{netns: cfg.Netns}),
	}
}

// config loads the network the runtime uses: the lexicographically first
// .conflist/.conf/.json file of the conf dir, read anew for every call so
// that a rewritten configuration takes effect for the next pod.
func (r *cniRuntime) config() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(r.confDir, []string{".conflist", ".conf", ".json"})
	if err != nil {
		return nil, fmt.Errorf("read CNI conf dir %q: %w", r.confDir, err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no CNI configuration in %q", r.confDir)
	}
	sort.Strings(files)
	f := files[0]
	if strings.HasSuffix(f, ".conflist") {
		list, err := libcni.ConfListFromFile(f)
		if err != nil {
			return nil, fmt.Errorf("load CNI config %q: %w", f, err)
		}
		return list, nil
	}
	conf, err := libcni.ConfFromFile(f) //nolint:staticcheck // runtimes still accept single-plugin .conf files
	if err != nil {
		return nil, fmt.Errorf("load CNI config %q: %w", f, err)
	}
	list, err := libcni.ConfListFromConf(conf) //nolint:staticcheck // see above
	if err != nil {
		return nil, fmt.Errorf("convert CNI config %q: %w", f, err)
	}
	return list, nil
}

func runtimeConf(pod *corev1.Pod, netnsPath string) *libcni.RuntimeConf {
	id := containerID(pod)
	return &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       netnsPath,
		IfName:      podIfName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", pod.Namespace},
			{"K8S_POD_NAME", pod.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", id},
			{"K8S_POD_UID", string(pod.UID)},
		},
	}
}

// containerID is the sandbox id given to CNI: the pod UID without dashes.
func containerID(pod *corev1.Pod) string { return strings.ReplaceAll(string(pod.UID), "-", "") }

// add runs CNI ADD and returns the pod's first IPv4 address. On failure it
// runs DEL so that no half-configured pod remains.
func (r *cniRuntime) add(ctx context.Context, pod *corev1.Pod, netnsPath string) (netip.Addr, error) {
	list, err := r.config()
	if err != nil {
		return netip.Addr{}, err
	}
	rt := runtimeConf(pod, netnsPath)
	res, err := r.cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		_ = r.cni.DelNetworkList(ctx, list, rt) // roll back; the ADD error is what matters
		return netip.Addr{}, fmt.Errorf("CNI ADD %q: %w", list.Name, err)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		_ = r.cni.DelNetworkList(ctx, list, rt)
		return netip.Addr{}, fmt.Errorf("CNI ADD %q: convert result: %w", list.Name, err)
	}
	for _, ipc := range cur.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	_ = r.cni.DelNetworkList(ctx, list, rt)
	return netip.Addr{}, fmt.Errorf("CNI ADD %q: result has no IPv4 address", list.Name)
}

// del runs CNI DEL. Plugins must succeed when the namespace is gone.
func (r *cniRuntime) del(ctx context.Context, pod *corev1.Pod, netnsPath string) error {
	list, err := r.config()
	if err != nil {
		return err
	}
	if err := r.cni.DelNetworkList(ctx, list, runtimeConf(pod, netnsPath)); err != nil {
		return fmt.Errorf("CNI DEL %q: %w", list.Name, err)
	}
	return nil
}

// nodeExec runs CNI plugins inside the node's network namespace.
type nodeExec struct {
	netns string
}

var _ invoke.Exec = nodeExec{}

func (e nodeExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+namedns.Path(e.netns), "--", pluginPath)
	cmd.Env = environ
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		// A plugin reports failure as a CNI error on stdout.
		var cniErr types.Error
		if json.Unmarshal(stdout.Bytes(), &cniErr) == nil && (cniErr.Code != 0 || cniErr.Msg != "") {
			return nil, &cniErr
		}
		return nil, fmt.Errorf("run %s: %w: %s", filepath.Base(pluginPath), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func (nodeExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (nodeExec) Decode(b []byte) (version.PluginInfo, error) {
	var d version.PluginDecoder
	info, err := d.Decode(b)
	if err != nil {
		return nil, errors.Join(errors.New("decode plugin version"), err)
	}
	return info, nil
}
