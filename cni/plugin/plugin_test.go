package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"

	"github.com/tunmesh/tunmesh/cni/cniapi"
	"github.com/tunmesh/tunmesh/cni/cniapi/cniapitest"
)

var wantIPs = []netip.Prefix{netip.MustParsePrefix("10.244.1.5/24"), netip.MustParsePrefix("fd00:10:244:1::5/64")}

// parseResult parses a plugin's stdout in cniVersion and returns it as a
// current result; it fails unless stdout is exactly one result document in
// that version.
func parseResult(t *testing.T, out []byte, cniVersion string) *types100.Result {
	t.Helper()
	var head struct {
		CNIVersion string `json:"cniVersion"`
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	if err := dec.Decode(&head); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, out)
	}
	if dec.More() {
		t.Fatalf("stdout holds more than the result:\n%s", out)
	}
	if head.CNIVersion != cniVersion {
		t.Fatalf("result cniVersion = %q, want %q", head.CNIVersion, cniVersion)
	}
	res, err := version.NewResult(cniVersion, out)
	if err != nil {
		t.Fatalf("parse result: %v", err)
	}
	cur, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return cur
}

// asJSON normalises v for comparison.
func asJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	b, _ = json.Marshal(m)
	return string(b)
}

// TestAddCheckDel runs the life of a meshed pod over every CNI version,
// against a fake agent that creates a real TUN in a real namespace.
func TestAddCheckDel(t *testing.T) {
	requireRoot(t)
	for _, ver := range SupportedVersions {
		t.Run(ver, func(t *testing.T) {
			t.Parallel()
			podNS := newNS(t)
			agent := tunAgent()
			sock := cniapitest.Serve(t, agent)
			prev := bridgePrevResult(podNS.Path())
			rawPrev := rawResult(t, prev, ver)
			args := &skel.CmdArgs{
				ContainerID: "ctr-" + strings.ReplaceAll(ver, ".", ""),
				Netns:       podNS.Path(),
				IfName:      "eth0",
				Args:        podCNIArgs,
				StdinData:   netConf(t, ver, sock, rawPrev, nil),
			}

			// ADD
			stdout, logs, err := run((*Plugin).Add, args)
			if err != nil {
				t.Fatalf("ADD: %v\nlogs: %s", err, logs)
			}
			res := parseResult(t, stdout.Bytes(), ver)
			wantPrev := parseResult(t, mustJSON(t, rawPrev), ver) // prevResult as seen through this version
			if n := len(res.Interfaces); n != len(wantPrev.Interfaces)+1 {
				t.Fatalf("result has %d interfaces, want %d: %s", n, len(wantPrev.Interfaces)+1, stdout)
			}
			if got, want := asJSON(t, res.Interfaces[:3]), asJSON(t, wantPrev.Interfaces); got != want {
				t.Errorf("prevResult interfaces changed:\n got %s\nwant %s", got, want)
			}
			if got := *res.Interfaces[3]; got != (types100.Interface{Name: tunName, Sandbox: podNS.Path()}) {
				t.Errorf("added interface = %+v, want %s in %s", got, tunName, podNS.Path())
			}
			for _, x := range []struct {
				name      string
				got, want any
			}{{"ips", res.IPs, wantPrev.IPs}, {"routes", res.Routes, wantPrev.Routes}, {"dns", res.DNS, wantPrev.DNS}} {
				if got, want := asJSON(t, x.got), asJSON(t, x.want); got != want {
					t.Errorf("result %s changed:\n got %s\nwant %s", x.name, got, want)
				}
			}
			for _, ip := range res.IPs {
				if ip.Interface != nil && *ip.Interface == 3 {
					t.Errorf("IP %s references the TUN", ip.Address.String())
				}
			}
			wantReq := cniapi.AddRequest{
				ContainerID: args.ContainerID, Netns: podNS.Path(), IfName: "eth0",
				PodNamespace: "shop", PodName: "web-0", PodUID: "6d1c2b7e-0d6e-4a53-9a43-2f6f0b8f1a11",
				IPs: wantIPs,
			}
			if adds := agent.Adds(); len(adds) != 1 || !reflect.DeepEqual(adds[0], wantReq) {
				t.Errorf("agent got adds %+v, want [%+v]", adds, wantReq)
			}
			tun, err := tunIn(podNS.Path())
			if err != nil {
				t.Fatalf("after ADD: %v", err)
			}
			if tun.Mode != netlink.TUNTAP_MODE_TUN || tun.Attrs().MTU != 65520 {
				t.Errorf("tm0: mode %v mtu %d", tun.Mode, tun.Attrs().MTU)
			}

			// CHECK gets the final result of the chain as prevResult.
			var final map[string]any
			if err := json.Unmarshal(stdout.Bytes(), &final); err != nil {
				t.Fatal(err)
			}
			checkArgs := *args
			checkArgs.StdinData = netConf(t, ver, sock, final, nil)
			stdout, logs, err = run((*Plugin).Check, &checkArgs)
			if hasCheck, _ := version.GreaterThanOrEqualTo(ver, "0.4.0"); !hasCheck {
				// 0.3.x has no CHECK: refused, the agent never asked.
				if code, msg := cniCode(t, err); code != types.ErrIncompatibleCNIVersion || !strings.Contains(msg, "no CHECK") {
					t.Errorf("CHECK on %s: %d %q, want ErrIncompatibleCNIVersion", ver, code, msg)
				}
				if n := len(agent.Checks()); n != 0 {
					t.Errorf("CHECK on %s reached the agent %d times", ver, n)
				}
			} else {
				if err != nil {
					t.Fatalf("CHECK: %v\nlogs: %s", err, logs)
				}
				wantCheck := cniapi.CheckRequest(wantReq)
				if checks := agent.Checks(); len(checks) != 1 || !reflect.DeepEqual(checks[0], wantCheck) {
					t.Errorf("agent got checks %+v, want [%+v]", checks, wantCheck)
				}
			}
			if stdout.Len() != 0 {
				t.Errorf("CHECK wrote to stdout: %s", stdout)
			}

			// DEL, DEL again, DEL after the namespace is gone.
			delArgs := checkArgs
			for i, step := range []string{"first", "repeated", "netns gone"} {
				if step == "netns gone" {
					if err := podNS.remove(); err != nil {
						t.Fatal(err)
					}
				}
				stdout, logs, err = run((*Plugin).Del, &delArgs)
				if err != nil {
					t.Fatalf("DEL (%s): %v\nlogs: %s", step, err, logs)
				}
				if stdout.Len() != 0 {
					t.Errorf("DEL wrote to stdout: %s", stdout)
				}
				if strings.Contains(logs.String(), "failed") {
					t.Errorf("DEL (%s) logged a failure of the fake agent: %s", step, logs)
				}
				if i == 0 {
					if _, err := tunIn(podNS.Path()); !errors.As(err, &netlink.LinkNotFoundError{}) {
						t.Errorf("after DEL, tm0 lookup: %v; want not found", err)
					}
				}
			}
			if dels := agent.Dels(); len(dels) != 3 || dels[0] != (cniapi.DelRequest{
				ContainerID: args.ContainerID, Netns: podNS.Path(), IfName: "eth0", PodNamespace: "shop", PodName: "web-0",
			}) {
				t.Errorf("agent got dels %+v", dels)
			}
		})
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// podArgs returns CmdArgs for a pod whose namespace need not exist: for
// paths where the plugin never reaches a namespace.
func fakePodArgs(conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: "ctr-fake",
		Netns:       "/var/run/netns/tunmesh-test-absent",
		IfName:      "eth0",
		Args:        podCNIArgs,
		StdinData:   conf,
	}
}

// TestPassThrough checks that prevResult comes out unchanged when the agent
// does not mesh the pod, or is down and failOpen is set.
func TestPassThrough(t *testing.T) {
	for _, ver := range SupportedVersions {
		t.Run(ver, func(t *testing.T) {
			notMeshed := &cniapitest.Agent{OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
				return cniapi.AddResponse{Reason: "namespace annotated config.tunmesh.io/mesh=disabled"}, nil
			}}
			for _, tc := range []struct {
				name   string
				socket string
				extra  map[string]any
				log    string
			}{
				{"not meshed", cniapitest.Serve(t, notMeshed), nil, "namespace annotated"},
				{"fail open, no socket", absentSocket(t), map[string]any{"failOpen": true}, "failing open"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), ver)
					stdout, logs, err := run((*Plugin).Add, fakePodArgs(netConf(t, ver, tc.socket, prev, tc.extra)))
					if err != nil {
						t.Fatalf("ADD: %v", err)
					}
					var got map[string]any
					if err := json.Unmarshal(stdout.Bytes(), &got); err != nil {
						t.Fatalf("stdout: %v\n%s", err, stdout)
					}
					if !reflect.DeepEqual(got, prev) {
						t.Errorf("result differs from prevResult:\n got %s\nwant %s", mustJSON(t, got), mustJSON(t, prev))
					}
					if !strings.Contains(logs.String(), tc.log) {
						t.Errorf("logs lack %q: %s", tc.log, logs)
					}
				})
			}
		})
	}
}

func TestAddAgentFailures(t *testing.T) {
	noDir := filepath.Join(t.TempDir(), "gone", "cni.sock") // not even the directory exists
	for _, ver := range SupportedVersions {
		t.Run(ver, func(t *testing.T) {
			prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), ver)
			busy := &cniapitest.Agent{OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
				return cniapi.AddResponse{}, cniapi.Errorf(cniapi.CodeTryAgainLater, "agent is syncing pods")
			}}
			stuck := &cniapitest.Agent{OnAdd: func(ctx context.Context, _ cniapi.AddRequest) (cniapi.AddResponse, error) {
				<-ctx.Done() // ends when the plugin hangs up
				return cniapi.AddResponse{}, ctx.Err()
			}}
			broken := &cniapitest.Agent{OnAdd: func(context.Context, cniapi.AddRequest) (cniapi.AddResponse, error) {
				return cniapi.AddResponse{}, errors.New("create tun: operation not permitted")
			}}
			for _, tc := range []struct {
				name   string
				socket string
				extra  map[string]any
				code   uint
				msg    string
			}{
				{"agent down", absentSocket(t), nil, types.ErrTryAgainLater, "not reachable on socket"},
				{"agent down, no dir", noDir, nil, types.ErrTryAgainLater, "not reachable on socket"},
				{"agent busy", cniapitest.Serve(t, busy), nil, types.ErrTryAgainLater, "agent is syncing pods"},
				{"agent stuck", cniapitest.Serve(t, stuck), map[string]any{"timeout": "300ms"}, types.ErrTryAgainLater, "did not answer add in time"},
				{"agent error", cniapitest.Serve(t, broken), nil, types.ErrInternal, "operation not permitted"},
				{"agent error, failOpen", cniapitest.Serve(t, broken), map[string]any{"failOpen": true}, types.ErrInternal, "operation not permitted"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					stdout, _, err := run((*Plugin).Add, fakePodArgs(netConf(t, ver, tc.socket, prev, tc.extra)))
					if err == nil {
						t.Fatalf("ADD succeeded: %s", stdout)
					}
					code, msg := cniCode(t, err)
					if code != tc.code || !strings.Contains(msg, tc.msg) {
						t.Errorf("error = %d %q, want %d containing %q", code, msg, tc.code, tc.msg)
					}
					if tc.code == types.ErrTryAgainLater && strings.HasPrefix(tc.name, "agent down") && !strings.Contains(msg, tc.socket) {
						t.Errorf("error %q does not name the socket %q", msg, tc.socket)
					}
					if stdout.Len() != 0 {
						t.Errorf("failed ADD wrote to stdout: %s", stdout)
					}
				})
			}
		})
	}
}

// TestBadInput checks that bad configs and arguments give the right CNI
// error codes, never reach the agent and never panic.
func TestBadInput(t *testing.T) {
	agent := &cniapitest.Agent{}
	sock := cniapitest.Serve(t, agent)
	prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), "1.0.0")
	good := func(extra map[string]any) []byte { return netConf(t, "1.0.0", sock, prev, extra) }
	type cmd = func(*Plugin, *skel.CmdArgs) error
	for _, tc := range []struct {
		name string
		cmds map[string]cmd
		conf []byte
		args string
		code uint
		msg  string
	}{
		{"malformed json", all, []byte(`{"cniVersion":"1.0.0","name":`), podCNIArgs, types.ErrDecodingFailure, "decode tunmesh-cni config"},
		{"wrong type", all, []byte(`{"cniVersion":"1.0.0","name":"n","failOpen":"yes"}`), podCNIArgs, types.ErrDecodingFailure, "failOpen"},
		{"unknown cniVersion", all, netConf(t, "9.9.9", sock, prev, nil), podCNIArgs, types.ErrIncompatibleCNIVersion, `"cniVersion" "9.9.9"`},
		{"no cniVersion", all, []byte(`{"name":"n","type":"tunmesh-cni"}`), podCNIArgs, types.ErrIncompatibleCNIVersion, `"cniVersion" ""`},
		{"relative socket", all, good(map[string]any{"socket": "run/cni.sock"}), podCNIArgs, types.ErrInvalidNetworkConfig, `invalid "socket" "run/cni.sock"`},
		{"bad timeout", all, good(map[string]any{"timeout": "soon"}), podCNIArgs, types.ErrInvalidNetworkConfig, `invalid "timeout" "soon"`},
		{"negative timeout", all, good(map[string]any{"timeout": "-1s"}), podCNIArgs, types.ErrInvalidNetworkConfig, `invalid "timeout" "-1s"`},
		{"relative logFile", all, good(map[string]any{"logFile": "cni.log"}), podCNIArgs, types.ErrInvalidNetworkConfig, `invalid "logFile" "cni.log"`},
		{"missing prevResult", addCheck, netConf(t, "1.0.0", sock, nil, nil), podCNIArgs, types.ErrInvalidNetworkConfig, `missing "prevResult"`},
		{"garbage prevResult", addCheck, good(map[string]any{"prevResult": map[string]any{"ips": "10.0.0.1"}}), podCNIArgs, types.ErrDecodingFailure, `decode "prevResult"`},
		{"missing CNI_ARGS", addCheck, good(nil), "", types.ErrInvalidEnvironmentVariables, "K8S_POD_NAMESPACE and K8S_POD_NAME"},
		{"missing pod name", addCheck, good(nil), "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop", types.ErrInvalidEnvironmentVariables, "lacks K8S_POD_NAME"},
		{"malformed CNI_ARGS", addCheck, good(nil), "K8S_POD_NAMESPACE=shop;junk", types.ErrInvalidEnvironmentVariables, `invalid CNI_ARGS pair "junk"`},
	} {
		for name, fn := range tc.cmds {
			t.Run(tc.name+"/"+name, func(t *testing.T) {
				args := fakePodArgs(tc.conf)
				args.Args = tc.args
				stdout, _, err := run(fn, args)
				if err == nil {
					t.Fatalf("%s succeeded: %s", name, stdout)
				}
				code, msg := cniCode(t, err)
				if code != tc.code || !strings.Contains(msg, tc.msg) {
					t.Errorf("error = %d %q, want %d containing %q", code, msg, tc.code, tc.msg)
				}
				if stdout.Len() != 0 {
					t.Errorf("stdout: %s", stdout)
				}
			})
		}
	}
	if n := len(agent.Adds()) + len(agent.Checks()) + len(agent.Dels()) + agent.Statuses() + len(agent.GCs()); n != 0 {
		t.Errorf("bad input reached the agent %d times", n)
	}
}

var (
	all = map[string]func(*Plugin, *skel.CmdArgs) error{
		"ADD": (*Plugin).Add, "CHECK": (*Plugin).Check, "DEL": (*Plugin).Del, "STATUS": (*Plugin).Status, "GC": (*Plugin).GC,
	}
	addCheck = map[string]func(*Plugin, *skel.CmdArgs) error{"ADD": (*Plugin).Add, "CHECK": (*Plugin).Check}
)

func TestDelBestEffort(t *testing.T) {
	failing := &cniapitest.Agent{OnDel: func(context.Context, cniapi.DelRequest) error {
		return cniapi.Errorf(cniapi.CodeTryAgainLater, "state dir read-only")
	}}
	ok := &cniapitest.Agent{}
	for _, ver := range SupportedVersions {
		for _, tc := range []struct {
			name   string
			socket string
			netns  string
			args   string
			log    string
		}{
			{"agent down", absentSocket(t), "/var/run/netns/gone", podCNIArgs, "tunmesh agent unavailable"},
			{"agent fails", cniapitest.Serve(t, failing), "/var/run/netns/gone", podCNIArgs, "state dir read-only"},
			{"no netns, no CNI_ARGS", cniapitest.Serve(t, ok), "", "", "pod released"},
			{"unreadable CNI_ARGS", cniapitest.Serve(t, ok), "", "junk", "ignoring unreadable CNI_ARGS"},
		} {
			t.Run(ver+"/"+tc.name, func(t *testing.T) {
				args := fakePodArgs(netConf(t, ver, tc.socket, nil, nil))
				args.Netns, args.Args = tc.netns, tc.args
				stdout, logs, err := run((*Plugin).Del, args)
				if err != nil {
					t.Fatalf("DEL: %v", err)
				}
				if stdout.Len() != 0 {
					t.Errorf("stdout: %s", stdout)
				}
				if !strings.Contains(logs.String(), tc.log) {
					t.Errorf("logs lack %q: %s", tc.log, logs)
				}
			})
		}
	}
	if dels := ok.Dels(); len(dels) != 2*len(SupportedVersions) || dels[0] != (cniapi.DelRequest{ContainerID: "ctr-fake", IfName: "eth0"}) {
		t.Errorf("agent got dels %+v", dels)
	}
}

func TestCheckAgentFailures(t *testing.T) {
	prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), "1.0.0")
	missing := &cniapitest.Agent{OnCheck: func(context.Context, cniapi.CheckRequest) error {
		return cniapi.Errorf(cniapi.CodeGeneric, "tm0 missing in pod shop/web-0")
	}}
	for _, tc := range []struct {
		name   string
		socket string
		extra  map[string]any
		code   uint // 0: success
		msg    string
	}{
		{"agent down", absentSocket(t), nil, types.ErrTryAgainLater, "not reachable on socket"},
		{"agent down, failOpen", absentSocket(t), map[string]any{"failOpen": true}, 0, ""},
		{"agent reports", cniapitest.Serve(t, missing), nil, types.ErrInternal, "tm0 missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := run((*Plugin).Check, fakePodArgs(netConf(t, "1.0.0", tc.socket, prev, tc.extra)))
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("CHECK: %v", err)
				}
				return
			}
			code, msg := cniCode(t, err)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("error = %d %q, want %d containing %q", code, msg, tc.code, tc.msg)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	notReady := &cniapitest.Agent{OnStatus: func(context.Context) cniapi.StatusResponse {
		return cniapi.StatusResponse{Message: "waiting for pod informer sync"}
	}}
	for _, tc := range []struct {
		name   string
		socket string
		extra  map[string]any
		code   uint
		msg    string
	}{
		{"ready", cniapitest.Serve(t, &cniapitest.Agent{}), nil, 0, ""},
		{"not ready", cniapitest.Serve(t, notReady), nil, types.ErrPluginNotAvailable, "not ready; waiting for pod informer sync"},
		{"agent down", absentSocket(t), nil, types.ErrPluginNotAvailable, "is not available"},
		{"agent down, failOpen", absentSocket(t), map[string]any{"failOpen": true}, 0, ""},
		{"not ready, failOpen", cniapitest.Serve(t, notReady), map[string]any{"failOpen": true}, types.ErrPluginNotAvailable, "not ready"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, _, err := run((*Plugin).Status, &skel.CmdArgs{StdinData: netConf(t, "1.1.0", tc.socket, nil, tc.extra)})
			if stdout.Len() != 0 {
				t.Errorf("stdout: %s", stdout)
			}
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("STATUS: %v", err)
				}
				return
			}
			code, msg := cniCode(t, err)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("error = %d %q, want %d containing %q", code, msg, tc.code, tc.msg)
			}
			if strings.HasPrefix(tc.name, "agent down") && !strings.Contains(msg, tc.socket) {
				t.Errorf("error %q does not name the socket", msg)
			}
		})
	}
}

func TestGC(t *testing.T) {
	agent := &cniapitest.Agent{}
	attachments := []map[string]string{{"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2", "ifname": "net1"}}
	conf := netConf(t, "1.1.0", cniapitest.Serve(t, agent), nil, map[string]any{"cni.dev/valid-attachments": attachments})
	if _, _, err := run((*Plugin).GC, &skel.CmdArgs{StdinData: conf}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	want := cniapi.GCRequest{ValidAttachments: []cniapi.Attachment{{ContainerID: "a1", IfName: "eth0"}, {ContainerID: "b2", IfName: "net1"}}}
	if gcs := agent.GCs(); len(gcs) != 1 || !reflect.DeepEqual(gcs[0], want) {
		t.Errorf("agent got gcs %+v, want [%+v]", gcs, want)
	}

	// No attachments left: the agent gets an empty list, not null.
	if _, _, err := run((*Plugin).GC, &skel.CmdArgs{StdinData: netConf(t, "1.1.0", cniapitest.Serve(t, agent), nil, nil)}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if gcs := agent.GCs(); len(gcs) != 2 || gcs[1].ValidAttachments == nil || len(gcs[1].ValidAttachments) != 0 {
		t.Errorf("agent got gcs %+v", gcs)
	}

	_, logs, err := run((*Plugin).GC, &skel.CmdArgs{StdinData: netConf(t, "1.1.0", absentSocket(t), nil, nil)})
	if err != nil || !strings.Contains(logs.String(), "skipping gc") {
		t.Errorf("GC with the agent down: %v; logs %s", err, logs)
	}

	failing := &cniapitest.Agent{OnGC: func(context.Context, cniapi.GCRequest) error { return errors.New("state dir unreadable") }}
	_, _, err = run((*Plugin).GC, &skel.CmdArgs{StdinData: netConf(t, "1.1.0", cniapitest.Serve(t, failing), nil, nil)})
	if code, msg := cniCode(t, err); code != types.ErrInternal || !strings.Contains(msg, "state dir unreadable") {
		t.Errorf("GC error = %d %q", code, msg)
	}
}

func TestLogFile(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "tunmesh", "tunmesh-cni.log") // the directory is created
	prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), "1.0.0")
	conf := netConf(t, "1.0.0", absentSocket(t), prev, map[string]any{"failOpen": true, "logFile": logFile})
	stdout, logs, err := run((*Plugin).Add, fakePodArgs(conf))
	if err != nil {
		t.Fatal(err)
	}
	if logs.Len() != 0 {
		t.Errorf("stderr got logs despite logFile: %s", logs)
	}
	b, err := os.ReadFile(logFile)
	if err != nil || !strings.Contains(string(b), "failing open") || !strings.Contains(string(b), "container_id=ctr-fake") {
		t.Errorf("log file: %v %s", err, b)
	}
	if fi, err := os.Stat(logFile); err == nil && fi.Mode().Perm() != 0o600 {
		t.Errorf("log file mode %v", fi.Mode().Perm())
	}
	parseResult(t, stdout.Bytes(), "1.0.0")

	// An unwritable log file falls back to stderr.
	conf = netConf(t, "1.0.0", absentSocket(t), prev, map[string]any{"failOpen": true, "logFile": "/proc/tunmesh-no-such/x.log"})
	_, logs, err = run((*Plugin).Add, fakePodArgs(conf))
	if err != nil || !strings.Contains(logs.String(), "cannot open log file") || !strings.Contains(logs.String(), "failing open") {
		t.Errorf("fallback: %v; stderr %s", err, logs)
	}
}

// TestRepeatedAdd checks that a runtime's retried ADD, whose prevResult may
// already hold the TUN, does not list it twice.
func TestRepeatedAdd(t *testing.T) {
	prev := bridgePrevResult("/var/run/netns/p")
	prev.Interfaces = append(prev.Interfaces, &types100.Interface{Name: tunName, Sandbox: "/var/run/netns/p"})
	addInterface(prev, tunName, "/var/run/netns/p")
	if n := len(prev.Interfaces); n != 4 {
		t.Errorf("%d interfaces after a repeated add", n)
	}
}

func TestPodIPs(t *testing.T) {
	res := bridgePrevResult("/var/run/netns/p")
	zero, bad := 0, 9
	host := *res.IPs[0]
	host.Interface = &zero // an address on the bridge: not the pod's
	noIface := *res.IPs[0]
	noIface.Interface = nil
	noIface.Address.IP = noIface.Address.IP.To16() // 16-byte form of an IPv4 address
	outOfRange := *res.IPs[1]
	outOfRange.Interface = &bad
	res.IPs = append(res.IPs, &host, nil, &noIface, &outOfRange)
	got := podIPs(res)
	want := append(slicesClone(wantIPs), netip.MustParsePrefix("10.244.1.5/24"), netip.MustParsePrefix("fd00:10:244:1::5/64"))
	if !reflect.DeepEqual(got, want) {
		t.Errorf("podIPs = %v, want %v", got, want)
	}
}

func slicesClone[T any](s []T) []T { return append([]T(nil), s...) }

func TestParsePodArgs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want podArgs
		err  bool
	}{
		{"", podArgs{}, false},
		{podCNIArgs, podArgs{"shop", "web-0", "6d1c2b7e-0d6e-4a53-9a43-2f6f0b8f1a11"}, false},
		{"K8S_POD_NAME=a;;K8S_POD_NAMESPACE=b;", podArgs{Namespace: "b", Name: "a"}, false},
		{"K8S_POD_NAME=a=b", podArgs{Name: "a=b"}, false},
		{"K8S_POD_NAME", podArgs{}, true},
	} {
		got, err := parsePodArgs(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("parsePodArgs(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

func TestParseConfigDefaults(t *testing.T) {
	conf, err := ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","type":"tunmesh-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.Socket != cniapi.DefaultSocket || conf.Timeout.String() != "10s" || conf.FailOpen || conf.LogFile != "" {
		t.Errorf("defaults: %+v", conf)
	}
	conf, err = ParseConfig([]byte(`{"cniVersion":"0.4.0","name":"n","socket":"/run/x.sock","timeout":"2m30s","failOpen":true,"logFile":"/var/log/x.log","runtimeConfig":{"a":1},"args":{"b":2}}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.Socket != "/run/x.sock" || conf.Timeout.String() != "2m30s" || !conf.FailOpen || conf.LogFile != "/var/log/x.log" {
		t.Errorf("parsed: %+v", conf)
	}
}

// TestVersionGates: CHECK needs CNI 0.4.0, STATUS and GC 1.1.0; older
// configs get ErrIncompatibleCNIVersion and the agent is never asked.
func TestVersionGates(t *testing.T) {
	agent := &cniapitest.Agent{}
	sock := cniapitest.Serve(t, agent)
	for _, tc := range []struct {
		cmd      string
		fn       func(*Plugin, *skel.CmdArgs) error
		refused  []string
		accepted []string
	}{
		{"CHECK", (*Plugin).Check, []string{"0.3.0", "0.3.1"}, []string{"0.4.0", "1.0.0", "1.1.0"}},
		{"STATUS", (*Plugin).Status, []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"}, []string{"1.1.0"}},
		{"GC", (*Plugin).GC, []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0"}, []string{"1.1.0"}},
	} {
		for _, ver := range tc.refused {
			t.Run(tc.cmd+"/"+ver, func(t *testing.T) {
				prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), ver)
				_, _, err := run(tc.fn, fakePodArgs(netConf(t, ver, sock, prev, nil)))
				if code, msg := cniCode(t, err); code != types.ErrIncompatibleCNIVersion || !strings.Contains(msg, "no "+tc.cmd) {
					t.Errorf("%s on %s: %d %q, want ErrIncompatibleCNIVersion", tc.cmd, ver, code, msg)
				}
			})
		}
		for _, ver := range tc.accepted {
			t.Run(tc.cmd+"/"+ver, func(t *testing.T) {
				prev := rawResult(t, bridgePrevResult("/var/run/netns/tunmesh-test-absent"), ver)
				if _, _, err := run(tc.fn, fakePodArgs(netConf(t, ver, sock, prev, nil))); err != nil {
					t.Errorf("%s on %s: %v", tc.cmd, ver, err)
				}
			})
		}
	}
	if n := len(agent.Checks()); n != 3 {
		t.Errorf("agent got %d checks, want 3 (0.4.0, 1.0.0, 1.1.0)", n)
	}
	if n := agent.Statuses(); n != 1 {
		t.Errorf("agent got %d status requests, want 1", n)
	}
	if n := len(agent.GCs()); n != 1 {
		t.Errorf("agent got %d gc requests, want 1", n)
	}
}
