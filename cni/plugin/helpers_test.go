package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/cniapi/cniapitest"
)

const tunName = "tm0"

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces and TUN devices")
	}
}

// testNS is a network namespace made for one test and removed on cleanup,
// even if the test fails or removed it itself.
type testNS struct {
	ns.NetNS
	once sync.Once
}

func newNS(t *testing.T) *testNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	tn := &testNS{NetNS: n}
	t.Cleanup(func() {
		if err := tn.remove(); err != nil {
			t.Errorf("remove netns %s: %v", n.Path(), err)
		}
	})
	return tn
}

// remove unmounts and deletes the namespace; later calls do nothing.
func (n *testNS) remove() error {
	var err error
	n.once.Do(func() {
		err = errors.Join(n.Close(), testutils.UnmountNS(n.NetNS))
	})
	return err
}

// tunAgent is a fake agent that, like the real one, creates a persistent TUN
// tm0 in the pod's namespace on Add, removes it on Del (succeeding when the
// namespace or the device is already gone) and checks it on Check.
func tunAgent() *cniapitest.Agent {
	return &cniapitest.Agent{
		OnAdd: func(_ context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error) {
			err := ns.WithNetNSPath(req.Netns, func(ns.NetNS) error {
				tun := &netlink.Tuntap{
					LinkAttrs: netlink.LinkAttrs{Name: tunName},
					Mode:      netlink.TUNTAP_MODE_TUN,
					Flags:     netlink.TUNTAP_NO_PI,
				}
				if err := netlink.LinkAdd(tun); err != nil && !errors.Is(err, os.ErrExist) {
					if _, lerr := netlink.LinkByName(tunName); lerr != nil {
						return fmt.Errorf("add tun %q: %w", tunName, err)
					}
				}
				link, err := netlink.LinkByName(tunName)
				if err != nil {
					return err
				}
				// A tuntap is created by ioctl, which sets no MTU.
				if err := netlink.LinkSetMTU(link, 65520); err != nil {
					return err
				}
				return netlink.LinkSetUp(link)
			})
			if err != nil {
				return cniapi.AddResponse{}, err
			}
			return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: tunName, Sandbox: req.Netns}}, nil
		},
		OnDel: func(_ context.Context, req cniapi.DelRequest) error {
			if req.Netns == "" {
				return nil
			}
			err := ns.WithNetNSPath(req.Netns, func(ns.NetNS) error {
				link, err := netlink.LinkByName(tunName)
				if errors.As(err, &netlink.LinkNotFoundError{}) {
					return nil
				}
				if err != nil {
					return err
				}
				return netlink.LinkDel(link)
			})
			if errors.As(err, &ns.NSPathNotExistErr{}) {
				return nil
			}
			return err
		},
		OnCheck: func(_ context.Context, req cniapi.CheckRequest) error {
			if _, err := tunIn(req.Netns); err != nil {
				return cniapi.Errorf(cniapi.CodeGeneric, "pod %s/%s: %v", req.PodNamespace, req.PodName, err)
			}
			return nil
		},
	}
}

// tunIn returns the TUN tm0 in the namespace at path.
func tunIn(path string) (*netlink.Tuntap, error) {
	var tun *netlink.Tuntap
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		link, err := netlink.LinkByName(tunName)
		if err != nil {
			return err
		}
		t, ok := link.(*netlink.Tuntap)
		if !ok {
			return fmt.Errorf("%s is a %s, not a tuntap", tunName, link.Type())
		}
		tun = t
		return nil
	})
	return tun, err
}

// bridgePrevResult is what the bridge plugin with host-local IPAM answers for
// a dual-stack pod: the bridge and the host end of the veth (no sandbox), the
// pod's eth0, its addresses on eth0, default routes and DNS.
func bridgePrevResult(netns string) *types100.Result {
	two := 2
	mustCIDR := func(s string) net.IPNet {
		ip, n, err := net.ParseCIDR(s)
		if err != nil {
			panic(err)
		}
		n.IP = ip
		return *n
	}
	_, v4Default, _ := net.ParseCIDR("0.0.0.0/0")
	_, v6Default, _ := net.ParseCIDR("::/0")
	return &types100.Result{
		CNIVersion: "1.0.0",
		Interfaces: []*types100.Interface{
			{Name: "cni0", Mac: "b2:3c:5e:11:22:33"},
			{Name: "veth7f3a9c21", Mac: "ee:aa:10:20:30:40"},
			{Name: "eth0", Mac: "0a:58:0a:f4:01:05", Sandbox: netns},
		},
		IPs: []*types100.IPConfig{
			{Interface: &two, Address: mustCIDR("10.244.1.5/24"), Gateway: net.ParseIP("10.244.1.1")},
			{Interface: &two, Address: mustCIDR("fd00:10:244:1::5/64"), Gateway: net.ParseIP("fd00:10:244:1::1")},
		},
		Routes: []*types.Route{
			{Dst: *v4Default, GW: net.ParseIP("10.244.1.1")},
			{Dst: *v6Default, GW: net.ParseIP("fd00:10:244:1::1")},
		},
		DNS: types.DNS{Nameservers: []string{"10.96.0.10"}, Search: []string{"shop.svc.cluster.local"}},
	}
}

// rawResult renders r in cniVersion as a generic JSON object, as found in a
// config's prevResult.
func rawResult(t *testing.T, r types.Result, cniVersion string) map[string]any {
	t.Helper()
	v, err := r.GetAsVersion(cniVersion)
	if err != nil {
		t.Fatalf("convert result to %s: %v", cniVersion, err)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// netConf builds a plugin config: cniVersion, the agent socket, the given
// prevResult (omitted if nil) and extra fields.
func netConf(t *testing.T, cniVersion, socket string, prev map[string]any, extra map[string]any) []byte {
	t.Helper()
	m := map[string]any{
		"cniVersion": cniVersion,
		"name":       "k8s-pod-network",
		"type":       "tunmesh-cni",
		"socket":     socket,
		"timeout":    "5s",
	}
	if prev != nil {
		m["prevResult"] = prev
	}
	for k, v := range extra {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const podCNIArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=3f2a;K8S_POD_UID=6d1c2b7e-0d6e-4a53-9a43-2f6f0b8f1a11"

// run calls one plugin command in-process and returns its stdout and logs.
func run(cmd func(*Plugin, *skel.CmdArgs) error, args *skel.CmdArgs) (stdout, logs *bytes.Buffer, err error) {
	stdout, logs = &bytes.Buffer{}, &bytes.Buffer{}
	p := &Plugin{Stdout: stdout, Stderr: logs}
	return stdout, logs, cmd(p, args)
}

// cniCode returns the CNI error code of err, failing if it is no *types.Error.
func cniCode(t *testing.T, err error) (uint, string) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *types.Error", err, err)
	}
	return e.Code, e.Error()
}

// absentSocket returns a socket path in a fresh directory that nothing
// listens on.
func absentSocket(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tmcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir + "/cni.sock"
}
