package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/cniapi/cniapitest"
)

const pkgPath = "github.com/tunmesh/tunmesh/cni/cmd/tunmesh-cni"

func goTool(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		t.Skipf("skipping: no go command found: %v", err)
	}
	return p
}

// TestDependencies keeps the plugin binary small and the protocol package
// importable from anywhere: the plugin links neither gVisor, wireguard-go nor
// client-go, and cniapi (with its test fake) uses the standard library only.
func TestDependencies(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping go list in -short mode")
	}
	out, err := exec.Command(goTool(t), "list", "-deps", pkgPath).CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"gvisor.dev/", "golang.zx2c4.com/wireguard", "k8s.io/client-go"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("tunmesh-cni depends on %s", dep)
			}
		}
	}
	out, err = exec.Command(goTool(t), "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}",
		"github.com/tunmesh/tunmesh/cni/cniapi", "github.com/tunmesh/tunmesh/cni/cniapi/cniapitest").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if !strings.HasPrefix(dep, "github.com/tunmesh/tunmesh/cni/cniapi") {
			t.Errorf("cniapi depends on non-standard package %s", dep)
		}
	}
}

var build struct {
	once sync.Once
	dir  string
	err  error
}

// pluginDir returns a directory holding the tunmesh-cni binary, built once
// per test run.
func pluginDir(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping binary build in -short mode")
	}
	goBin := goTool(t)
	build.once.Do(func() {
		build.dir, build.err = os.MkdirTemp("", "tunmesh-cni-bin")
		if build.err != nil {
			return
		}
		out, err := exec.Command(goBin, "build", "-o", filepath.Join(build.dir, "tunmesh-cni"), pkgPath).CombinedOutput()
		if err != nil {
			build.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if build.err != nil {
		t.Fatal(build.err)
	}
	return build.dir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	os.Exit(code)
}

// runPlugin runs the built binary as a runtime would.
func runPlugin(t *testing.T, env map[string]string, stdin string) (stdout, stderr string, exit int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(pluginDir(t), "tunmesh-cni"))
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var exitErr *exec.ExitError
	switch {
	case errors.As(err, &exitErr):
		exit = exitErr.ExitCode()
	case err != nil:
		t.Fatalf("run plugin: %v", err)
	}
	if strings.Contains(e.String(), "panic") || strings.Contains(e.String(), "goroutine ") {
		t.Errorf("plugin panicked: %s", e.String())
	}
	return o.String(), e.String(), exit
}

const prev100 = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/tunmesh-absent"}],"ips":[{"interface":0,"address":"10.244.1.5/24"}]}`

// TestBinaryErrors runs the binary through skel and checks the CNI error
// printed on stdout for each kind of bad input.
func TestBinaryErrors(t *testing.T) {
	dir, err := os.MkdirTemp("", "tmcni")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	down := filepath.Join(dir, "cni.sock")
	conf := func(ver string, withPrev bool) string {
		c := fmt.Sprintf(`{"cniVersion":%q,"name":"k8s","type":"tunmesh-cni","socket":%q,"timeout":"2s"`, ver, down)
		if withPrev {
			c += `,"prevResult":` + prev100
		}
		return c + "}"
	}
	env := func(cmd, args string) map[string]string {
		return map[string]string{
			"CNI_COMMAND": cmd, "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/tunmesh-absent",
			"CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": args,
		}
	}
	podArgs := "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"
	for _, tc := range []struct {
		name  string
		env   map[string]string
		stdin string
		code  uint
		msg   string
	}{
		{"malformed json", env("ADD", podArgs), `{"cniVersion":"1.0.0",`, 6, "unmarshal"},
		{"unknown cniVersion", env("ADD", podArgs), strings.Replace(conf("1.0.0", true), `"1.0.0"`, `"7.0.0"`, 1), 1, "incompatible CNI versions"},
		{"missing prevResult", env("ADD", podArgs), conf("1.0.0", false), 7, `missing "prevResult"`},
		{"missing CNI_ARGS", env("ADD", ""), conf("1.0.0", true), 4, "K8S_POD_NAMESPACE"},
		{"agent down", env("ADD", podArgs), conf("1.0.0", true), 11, fmt.Sprintf("not reachable on socket %q", down)},
		{"check agent down", env("CHECK", podArgs), conf("1.0.0", true), 11, "not reachable"},
		{"status agent down", env("STATUS", ""), conf("1.1.0", false), 50, "is not available"},
		// CNI 0.3.x has ADD and DEL only.
		{"check on 0.3.1", env("CHECK", podArgs), conf("0.3.1", true), 1, "CHECK"},
		{"status on 0.4.0", env("STATUS", ""), conf("0.4.0", false), 1, "STATUS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, exit := runPlugin(t, tc.env, tc.stdin)
			if exit != 1 {
				t.Errorf("exit = %d, want 1; stderr %s", exit, stderr)
			}
			var e struct {
				Code uint   `json:"code"`
				Msg  string `json:"msg"`
			}
			if err := json.Unmarshal([]byte(stdout), &e); err != nil {
				t.Fatalf("stdout is not a CNI error: %v\n%s", err, stdout)
			}
			if e.Code != tc.code || !strings.Contains(e.Msg, tc.msg) {
				t.Errorf("error = %d %q, want %d containing %q", e.Code, e.Msg, tc.code, tc.msg)
			}
		})
	}

	t.Run("del agent down", func(t *testing.T) {
		stdout, stderr, exit := runPlugin(t, env("DEL", podArgs), conf("1.0.0", true))
		if exit != 0 || stdout != "" || !strings.Contains(stderr, "tunmesh agent unavailable") {
			t.Errorf("exit %d, stdout %q, stderr %q", exit, stdout, stderr)
		}
	})
	// containerd sends DEL with an empty CNI_NETNS and no prevResult when
	// a finished Job pod's object is deleted (its sandbox is long gone):
	// it must succeed in every version, reaching the agent.
	t.Run("del without netns or prevResult", func(t *testing.T) {
		agent := &cniapitest.Agent{}
		sock := cniapitest.Serve(t, agent)
		versions := []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
		for _, ver := range versions {
			e := env("DEL", podArgs)
			e["CNI_NETNS"] = ""
			stdin := fmt.Sprintf(`{"cniVersion":%q,"name":"k8s","type":"tunmesh-cni","socket":%q,"timeout":"2s"}`, ver, sock)
			stdout, stderr, exit := runPlugin(t, e, stdin)
			if exit != 0 || stdout != "" {
				t.Errorf("%s: exit %d, stdout %q, stderr %q", ver, exit, stdout, stderr)
			}
		}
		dels := agent.Dels()
		if len(dels) != len(versions) {
			t.Fatalf("agent got %d dels, want %d", len(dels), len(versions))
		}
		for _, d := range dels {
			if d != (cniapi.DelRequest{ContainerID: "ctr1", IfName: "eth0", PodNamespace: "shop", PodName: "web-0"}) {
				t.Errorf("agent got del %+v", d)
			}
		}
	})
	t.Run("version", func(t *testing.T) {
		stdout, _, exit := runPlugin(t, map[string]string{"CNI_COMMAND": "VERSION"}, "")
		var v struct {
			Supported []string `json:"supportedVersions"`
		}
		if err := json.Unmarshal([]byte(stdout), &v); exit != 0 || err != nil || strings.Join(v.Supported, ",") != "0.3.0,0.3.1,0.4.0,1.0.0,1.1.0" {
			t.Errorf("VERSION: exit %d, %v, %s", exit, err, stdout)
		}
	})
	t.Run("about", func(t *testing.T) {
		stdout, stderr, exit := runPlugin(t, nil, "")
		if exit != 0 || stdout != "" || !strings.Contains(stderr, "tunmesh-cni") {
			t.Errorf("no command: exit %d, stdout %q, stderr %q", exit, stdout, stderr)
		}
	})
}

// refPluginDir finds the reference CNI plugins (bridge, host-local).
func refPluginDir(t *testing.T) string {
	t.Helper()
	for _, dir := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		_, errB := os.Stat(filepath.Join(dir, "bridge"))
		_, errH := os.Stat(filepath.Join(dir, "host-local"))
		if errB == nil && errH == nil {
			return dir
		}
	}
	t.Skip("skipping: reference CNI plugins bridge and host-local not found in /usr/lib/cni or /opt/cni/bin (Debian package containernetworking-plugins)")
	return ""
}

func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("remove netns: %v", err)
		}
	})
	return n
}

// tunAgent creates a persistent TUN tm0 in the pod on Add and removes it on
// Del, as the real agent does.
func tunAgent() *cniapitest.Agent {
	return &cniapitest.Agent{
		OnAdd: func(_ context.Context, req cniapi.AddRequest) (cniapi.AddResponse, error) {
			err := ns.WithNetNSPath(req.Netns, func(ns.NetNS) error {
				err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tm0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_NO_PI})
				if err != nil {
					return err
				}
				link, err := netlink.LinkByName("tm0")
				if err != nil {
					return err
				}
				return netlink.LinkSetUp(link)
			})
			if err != nil {
				return cniapi.AddResponse{}, err
			}
			return cniapi.AddResponse{Meshed: true, Interface: &cniapi.Interface{Name: "tm0", Sandbox: req.Netns}}, nil
		},
		OnDel: func(_ context.Context, req cniapi.DelRequest) error {
			err := ns.WithNetNSPath(req.Netns, func(ns.NetNS) error {
				link, err := netlink.LinkByName("tm0")
				if errors.As(err, &netlink.LinkNotFoundError{}) {
					return nil
				} else if err != nil {
					return err
				}
				return netlink.LinkDel(link)
			})
			if errors.As(err, &ns.NSPathNotExistErr{}) {
				return nil
			}
			return err
		},
	}
}

// TestLibcniEndToEnd runs the built binary the way a container runtime does:
// libcni executes the conflist bridge + host-local + tunmesh-cni for a pod
// namespace, from inside a "node" namespace so that the bridge stays off the
// host, against the fake agent.
func TestLibcniEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces")
	}
	refDir := refPluginDir(t)
	binDir := pluginDir(t)
	// Every version both tunmesh-cni and the reference plugins speak (the
	// reference plugins here stop at 1.0.0); 0.3.1 is what kindnet, GKE,
	// Calico and Flannel write.
	for i, ver := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"} {
		t.Run(ver, func(t *testing.T) {
			nodeNS, podNS := newNS(t), newNS(t)
			agent := tunAgent()
			sock := cniapitest.Serve(t, agent)
			tmp := t.TempDir()
			subnet := fmt.Sprintf("10.250.%d.0/24", 10+i)
			conflist := fmt.Sprintf(`{
  "cniVersion": %q,
  "name": "tunmesh-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "tmbr0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": %q}},
    {"type": "tunmesh-cni", "socket": %q, "timeout": "5s", "logFile": %q}
  ]
}`, ver, subnet, filepath.Join(tmp, "ipam"), sock, filepath.Join(tmp, "tunmesh-cni.log"))
			list, err := libcni.ConfListFromBytes([]byte(conflist))
			if err != nil {
				t.Fatal(err)
			}
			cni := libcni.NewCNIConfigWithCacheDir([]string{binDir, refDir}, filepath.Join(tmp, "cache"), nil)
			rt := &libcni.RuntimeConf{
				ContainerID: fmt.Sprintf("e2e%d%d", os.Getpid(), i),
				NetNS:       podNS.Path(),
				IfName:      "eth0",
				Args: [][2]string{
					{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "web-0"}, {"K8S_POD_UID", "uid-e2e"},
				},
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			// Plugins exec'd from inside Do inherit the node namespace of
			// the locked thread.
			inNode := func(f func() error) error { return nodeNS.Do(func(ns.NetNS) error { return f() }) }

			var res *types100.Result
			if err := inNode(func() error {
				r, err := cni.AddNetworkList(ctx, list, rt)
				if err != nil {
					return err
				}
				res, err = types100.NewResultFromResult(r)
				return err
			}); err != nil {
				logs, _ := os.ReadFile(filepath.Join(tmp, "tunmesh-cni.log"))
				t.Fatalf("AddNetworkList: %v\ntunmesh-cni log:\n%s", err, logs)
			}
			t.Cleanup(func() { // undo ADD even if an assertion below fails
				if err := inNode(func() error { return cni.DelNetworkList(context.Background(), list, rt) }); err != nil {
					t.Errorf("cleanup DelNetworkList: %v", err)
				}
			})

			// The final result: bridge's interfaces, then tm0 in the pod.
			var names []string
			for _, i := range res.Interfaces {
				names = append(names, i.Name+"@"+i.Sandbox)
			}
			last := res.Interfaces[len(res.Interfaces)-1]
			if len(res.Interfaces) != 4 || res.Interfaces[0].Name != "tmbr0" || res.Interfaces[2].Name != "eth0" ||
				*last != (types100.Interface{Name: "tm0", Sandbox: podNS.Path()}) {
				t.Fatalf("result interfaces = %v", names)
			}
			_, wantNet, _ := net.ParseCIDR(subnet)
			if len(res.IPs) != 1 || !wantNet.Contains(res.IPs[0].Address.IP) || *res.IPs[0].Interface != 2 {
				t.Fatalf("result IPs = %+v", res.IPs)
			}
			adds := agent.Adds()
			podIP := res.IPs[0].Address.String()
			if len(adds) != 1 || len(adds[0].IPs) != 1 || adds[0].IPs[0].String() != podIP ||
				adds[0].PodUID != "uid-e2e" || adds[0].Netns != podNS.Path() || adds[0].ContainerID != rt.ContainerID {
				t.Errorf("agent got adds %+v; pod IP %s", adds, podIP)
			}
			// Live state in the pod: eth0 with the address, tm0 a TUN.
			if err := podNS.Do(func(ns.NetNS) error {
				tm0, err := netlink.LinkByName("tm0")
				if err != nil {
					return err
				}
				if tun, ok := tm0.(*netlink.Tuntap); !ok || tun.Mode != netlink.TUNTAP_MODE_TUN {
					return fmt.Errorf("tm0 is %s %+v", tm0.Type(), tm0)
				}
				eth0, err := netlink.LinkByName("eth0")
				if err != nil {
					return err
				}
				addrs, err := netlink.AddrList(eth0, netlink.FAMILY_V4)
				if err != nil {
					return err
				}
				if len(addrs) != 1 || addrs[0].IPNet.String() != podIP {
					return fmt.Errorf("eth0 addresses %v, want %s", addrs, podIP)
				}
				return nil
			}); err != nil {
				t.Fatalf("pod state: %v", err)
			}

			err = inNode(func() error { return cni.CheckNetworkList(ctx, list, rt) })
			wantChecks := 1
			if ver == "0.3.0" || ver == "0.3.1" {
				// No CHECK before 0.4.0: libcni refuses it without running
				// a plugin.
				wantChecks = 0
				if err == nil || !strings.Contains(err.Error(), "does not support the CHECK command") {
					t.Errorf("CheckNetworkList on %s: %v, want refused", ver, err)
				}
			} else if err != nil {
				t.Errorf("CheckNetworkList: %v", err)
			}
			if n := len(agent.Checks()); n != wantChecks {
				t.Errorf("agent got %d checks, want %d", n, wantChecks)
			}

			if err := inNode(func() error { return cni.DelNetworkList(ctx, list, rt) }); err != nil {
				t.Fatalf("DelNetworkList: %v", err)
			}
			if dels := agent.Dels(); len(dels) != 1 || dels[0].ContainerID != rt.ContainerID || dels[0].PodName != "web-0" {
				t.Errorf("agent got dels %+v", dels)
			}
			if err := podNS.Do(func(ns.NetNS) error {
				if _, err := netlink.LinkByName("tm0"); !errors.As(err, &netlink.LinkNotFoundError{}) {
					return fmt.Errorf("tm0 after DEL: %v", err)
				}
				if _, err := netlink.LinkByName("eth0"); !errors.As(err, &netlink.LinkNotFoundError{}) {
					return fmt.Errorf("eth0 after DEL: %v", err)
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
			logs, _ := os.ReadFile(filepath.Join(tmp, "tunmesh-cni.log"))
			if !strings.Contains(string(logs), "pod meshed") || !strings.Contains(string(logs), "pod released") {
				t.Errorf("tunmesh-cni log:\n%s", logs)
			}
		})
	}
}

// TestLibcniShippedConflists runs, through libcni, the conflists real
// clusters ship as the installer leaves them (cni/install's golden files:
// kind's kindnet and GKE's containerd template, ptp + host-local + portmap
// at CNI 0.3.1, tunmesh-cni last), pointed at test paths: the result
// comes back in 0.3.1 with tm0 added, and DEL tears it all down.
func TestLibcniShippedConflists(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces")
	}
	refDir := refPluginDir(t)
	for _, p := range []string{"ptp", "portmap"} {
		if _, err := os.Stat(filepath.Join(refDir, p)); err != nil {
			t.Skipf("skipping: reference plugin %s not in %s", p, refDir)
		}
	}
	binDir := pluginDir(t)
	for i, name := range []string{"10-kindnet.conflist", "10-containerd-net.conflist"} {
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("..", "..", "install", "testdata", "golden", "shipped", name))
			if err != nil {
				t.Fatal(err)
			}
			nodeNS, podNS := newNS(t), newNS(t)
			agent := tunAgent()
			sock := cniapitest.Serve(t, agent)
			tmp := t.TempDir()
			subnet := fmt.Sprintf("10.251.%d.0/24", i)
			// Point the shipped file at this test: its subnet, an IPAM
			// dir, the fake agent's socket and a log file.
			var conf map[string]any
			if err := json.Unmarshal(raw, &conf); err != nil {
				t.Fatal(err)
			}
			if conf["cniVersion"] != "0.3.1" {
				t.Fatalf("%s: cniVersion %v", name, conf["cniVersion"])
			}
			for _, pl := range conf["plugins"].([]any) {
				m := pl.(map[string]any)
				switch m["type"] {
				case "ptp":
					ipam := m["ipam"].(map[string]any)
					ipam["dataDir"] = filepath.Join(tmp, "ipam")
					delete(ipam, "subnet")
					ipam["ranges"] = [][]map[string]string{{{"subnet": subnet}}}
				case "tunmesh-cni":
					m["socket"], m["logFile"], m["timeout"] = sock, filepath.Join(tmp, "tunmesh-cni.log"), "5s"
				}
			}
			b, err := json.Marshal(conf)
			if err != nil {
				t.Fatal(err)
			}
			list, err := libcni.ConfListFromBytes(b)
			if err != nil {
				t.Fatal(err)
			}
			cni := libcni.NewCNIConfigWithCacheDir([]string{binDir, refDir}, filepath.Join(tmp, "cache"), nil)
			rt := &libcni.RuntimeConf{
				ContainerID: fmt.Sprintf("shipped%d%d", os.Getpid(), i),
				NetNS:       podNS.Path(),
				IfName:      "eth0",
				Args:        [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "web-0"}},
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			inNode := func(f func() error) error { return nodeNS.Do(func(ns.NetNS) error { return f() }) }
			var res *types100.Result
			if err := inNode(func() error {
				r, err := cni.AddNetworkList(ctx, list, rt)
				if err != nil {
					return err
				}
				if v := r.Version(); v != "0.3.1" {
					return fmt.Errorf("result version %s, want 0.3.1", v)
				}
				res, err = types100.NewResultFromResult(r)
				return err
			}); err != nil {
				logs, _ := os.ReadFile(filepath.Join(tmp, "tunmesh-cni.log"))
				t.Fatalf("AddNetworkList: %v\ntunmesh-cni log:\n%s", err, logs)
			}
			t.Cleanup(func() {
				if err := inNode(func() error { return cni.DelNetworkList(context.Background(), list, rt) }); err != nil {
					t.Errorf("cleanup DelNetworkList: %v", err)
				}
			})
			last := res.Interfaces[len(res.Interfaces)-1]
			_, wantNet, _ := net.ParseCIDR(subnet)
			if *last != (types100.Interface{Name: "tm0", Sandbox: podNS.Path()}) || len(res.IPs) != 1 || !wantNet.Contains(res.IPs[0].Address.IP) {
				t.Fatalf("result: interfaces %+v, IPs %+v", res.Interfaces, res.IPs)
			}
			if adds := agent.Adds(); len(adds) != 1 || len(adds[0].IPs) != 1 || adds[0].IPs[0].String() != res.IPs[0].Address.String() {
				t.Errorf("agent got adds %+v", adds)
			}
			if err := inNode(func() error { return cni.DelNetworkList(ctx, list, rt) }); err != nil {
				t.Fatalf("DelNetworkList: %v", err)
			}
			if dels := agent.Dels(); len(dels) != 1 || dels[0].ContainerID != rt.ContainerID {
				t.Errorf("agent got dels %+v", dels)
			}
			if err := podNS.Do(func(ns.NetNS) error {
				if _, err := netlink.LinkByName("tm0"); !errors.As(err, &netlink.LinkNotFoundError{}) {
					return fmt.Errorf("tm0 after DEL: %v", err)
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
		})
	}
}
