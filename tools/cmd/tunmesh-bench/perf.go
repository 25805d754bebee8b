package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/bench"
)

// benchPath is one of the compared paths: a client pod, the address its
// tools dial, and the proxy processes whose CPU and memory count.
type benchPath struct {
	name   string
	client *corev1.Pod
	target string                // server pod IP, or 127.0.0.1 (the client's sidecar)
	procs  func() ([]int, error) // proxy processes; nil: none (kernel)
}

// serverApps are the app containers of a server pod, bound to addr
// ("" = every address).
func serverApps(addr string) [][]string {
	ip := addr
	if ip == "" {
		ip = "0.0.0.0"
	}
	iperf := []string{"iperf3", "-s", "-p", strconv.Itoa(iperfPort)}
	if addr != "" {
		iperf = append(iperf, "-B", addr)
	}
	return [][]string{
		iperf,
		{"sockperf", "server", "--tcp", "-i", ip, "-p", strconv.Itoa(sockperfPort)},
		{"tunmesh-workload", "http", "--listen", addr + ":" + strconv.Itoa(httpPort), "--text", "ok"},
	}
}

// profileTop is how many symbols of each profile the report lists.
const profileTop = 15

var sleeper = []string{"tunmesh-workload", "sleep"}

func runPerf(ctx context.Context, c *cluster, cfg Config, report io.Writer, log *slog.Logger) error {
	dir, err := os.MkdirTemp("", "tunmesh-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := sidecarPKI(dir); err != nil {
		return err
	}
	serverCfg := filepath.Join(dir, "server.cfg")
	if err := os.WriteFile(serverCfg, []byte(serverSidecarConfig(dir)), 0o644); err != nil {
		return err
	}
	if err := c.namespace(ctx, "bench-client", "bench-server"); err != nil {
		return err
	}
	specs := []podSpec{
		{name: "kernel-server", node: "node-2", sa: "bench-server", containers: serverApps("")},
		{name: "kernel-client", node: "node-1", sa: "bench-client", containers: [][]string{sleeper}},
		{name: "haproxy-server", node: "node-2", sa: "bench-server", containers: append(serverApps("127.0.0.1"), []string{"haproxy", "-db", "-f", serverCfg})},
		{name: "tunmesh-server", node: "node-2", sa: "bench-server", meshed: true, containers: serverApps("")},
		{name: "tunmesh-client", node: "node-1", sa: "bench-client", meshed: true, containers: [][]string{sleeper}},
	}
	wgServerCfg, wgClientCfg := filepath.Join(dir, "wg-server.cfg"), filepath.Join(dir, "wg-client.cfg")
	if cfg.Transport == "wireguard" {
		if err := os.WriteFile(wgServerCfg, []byte(serverSidecarConfig(dir)), 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(wgClientCfg, []byte(clientSidecarConfig(dir, wgServerIP)), 0o644); err != nil {
			return err
		}
		specs = append(specs, wireguardGoSpecs(wgServerCfg, wgClientCfg)...)
	}
	for _, s := range specs {
		if err := c.createPod(ctx, s); err != nil {
			return err
		}
	}
	// The client sidecar needs the server pod's IP.
	hs, err := c.waitRunning(ctx, 2*time.Minute, "haproxy-server")
	if err != nil {
		return err
	}
	clientCfg := filepath.Join(dir, "client.cfg")
	if err := os.WriteFile(clientCfg, []byte(clientSidecarConfig(dir, hs["haproxy-server"].Status.PodIP)), 0o644); err != nil {
		return err
	}
	if err := c.createPod(ctx, podSpec{name: "haproxy-client", node: "node-1", sa: "bench-client", containers: [][]string{sleeper, {"haproxy", "-db", "-f", clientCfg}}}); err != nil {
		return err
	}
	pods, err := c.waitRunning(ctx, 2*time.Minute, "kernel-server", "kernel-client", "haproxy-server", "haproxy-client", "tunmesh-server", "tunmesh-client")
	if err != nil {
		return err
	}
	clients := []string{"kernel-client", "haproxy-client", "tunmesh-client"}
	if cfg.Transport == "wireguard" {
		wg, err := c.waitRunning(ctx, 2*time.Minute, "wg-client", "wg-server")
		if err != nil {
			return err
		}
		if err := setupWireGuardGo(ctx, c, wg["wg-client"], wg["wg-server"]); err != nil {
			return err
		}
		pods["wg-client"], pods["wg-server"] = wg["wg-client"], wg["wg-server"]
		clients = append(clients, "wg-client")
	}
	for _, n := range clients {
		// hey opens thousands of connections a second from the client:
		// a wide port range and TIME_WAIT reuse keep it from running out
		// of ports (the same on every path).
		if err := setSysctls(c, pods[n], map[string]string{"net.ipv4.ip_local_port_range": "1024 65000", "net.ipv4.tcp_tw_reuse": "1"}); err != nil {
			return err
		}
	}
	paths := []benchPath{
		{name: bench.Kernel, client: pods["kernel-client"], target: pods["kernel-server"].Status.PodIP},
		{name: bench.HAProxy, client: pods["haproxy-client"], target: "127.0.0.1",
			procs: func() ([]int, error) { return haproxyPids(serverCfg, clientCfg) }},
		{name: bench.Tunmesh, client: pods["tunmesh-client"], target: pods["tunmesh-server"].Status.PodIP,
			procs: func() ([]int, error) {
				m, err := c.agentPids()
				return mapValues(m), err
			}},
	}
	if cfg.Transport == "wireguard" {
		paths = append(paths,
			benchPath{name: bench.WireGuardGo, client: pods["wg-client"], target: wgServerIP, procs: wireguardGoPids},
			benchPath{name: bench.HAProxyWireGuardGo, client: pods["wg-client"], target: "127.0.0.1",
				procs: func() ([]int, error) {
					hp, err := haproxyPids(wgServerCfg, wgClientCfg)
					if err != nil {
						return nil, err
					}
					wp, err := wireguardGoPids()
					return append(hp, wp...), err
				}})
	}
	for _, p := range paths {
		log.Info("warming up", "path", p.name)
		if err := warmUp(ctx, c, p, cfg); err != nil {
			return fmt.Errorf("%s path: %w", p.name, err)
		}
	}

	samples := map[string][]bench.Sample{}
	var failures []error
	measures := []struct {
		name string
		run  func(context.Context, *cluster, benchPath, Config, *bench.Sample) error
	}{
		{"throughput", measureThroughput},
		{"request/response", measureRR},
		{"new connections", measureConns},
	}
	for rep := 0; rep < cfg.Reps; rep++ {
		cur := map[string]*bench.Sample{}
		for _, p := range paths {
			s := bench.NaNSample()
			cur[p.name] = &s
		}
		// Interleaved, order rotated every repetition, so that drift of
		// the machine's load hits every path alike.
		order := rotate(paths, rep)
		for _, m := range measures {
			for _, p := range order {
				if err := ctx.Err(); err != nil {
					return err
				}
				if err := m.run(ctx, c, p, cfg, cur[p.name]); err != nil {
					log.Warn("measurement failed", "rep", rep+1, "path", p.name, "measure", m.name, "err", err)
					failures = append(failures, fmt.Errorf("rep %d %s %s: %w", rep+1, p.name, m.name, err))
				}
			}
		}
		for _, p := range paths {
			s := *cur[p.name]
			log.Info("repetition", "rep", rep+1, "path", p.name, "mb_per_s", round(s.MBps), "rr_p50_us", round(s.RRP50), "rr_p99_us", round(s.RRP99),
				"conn_per_s", round(s.ConnPerSec), "cpu_s_per_gb", round(s.ProxyCPUPerGB))
			samples[p.name] = append(samples[p.name], s)
		}
	}

	var sums []bench.Summary
	for _, p := range paths {
		rss := math.NaN()
		if p.procs != nil {
			pids, err := p.procs()
			if err != nil {
				failures = append(failures, fmt.Errorf("%s proxy memory: %w", p.name, err))
			}
			for _, pid := range pids {
				if v, err := rssMB(pid); err == nil && (math.IsNaN(rss) || v > rss) {
					rss = v
				}
			}
		}
		sums = append(sums, bench.Summarize(p.name, samples[p.name], rss))
	}
	fmt.Fprintf(report, "transport: %s (encrypt-all %v, wireguard-mtu %d; 0 = the agent's default)\n", cfg.Transport, cfg.EncryptAll, cfg.WireGuardMTU)
	fmt.Fprintf(report, "settings: %d repetitions, iperf3 -t %s -P %d, sockperf ping-pong --tcp -m %d -t %s --full-rtt (round trip), hey -c %d -z %s -disable-keepalive; cross-node (client on node-1, server on node-2)\n\n",
		cfg.Reps, secs(cfg.Duration), cfg.Parallel, cfg.MsgSize, secs(cfg.RRDuration), cfg.Clients, secs(cfg.ConnDuration))
	if err := bench.WriteTable(report, sums, bench.Evaluate(sums)); err != nil {
		return err
	}
	if cfg.Profile {
		fmt.Fprintf(report, "\nwhere the proxies' CPU goes during one more iperf3 run (perf record -e cpu-clock -F 999 -p <proxy pids>, perf report --sort dso,symbol; top %d):\n", profileTop)
		for _, p := range paths {
			if p.procs == nil {
				continue
			}
			log.Info("profiling", "path", p.name)
			es, err := profileThroughput(ctx, c, p, cfg, dir)
			if err != nil {
				failures = append(failures, fmt.Errorf("%s profile: %w", p.name, err))
				continue
			}
			fmt.Fprintln(report)
			if err := bench.WriteProfile(report, p.name, es, profileTop); err != nil {
				return err
			}
		}
	}
	if len(failures) > 0 {
		fmt.Fprintf(report, "\n%d measurement(s) failed (their cells are left out of the medians):\n", len(failures))
		for _, f := range failures {
			fmt.Fprintf(report, "- %v\n", f)
		}
		return fmt.Errorf("%d measurement(s) failed", len(failures))
	}
	return nil
}

// rotate returns xs started at index n (mod len): repetition n runs the
// paths in this order, so that each path is first, second and last alike.
func rotate[T any](xs []T, n int) []T {
	if len(xs) == 0 {
		return nil
	}
	n %= len(xs)
	return append(slices.Clone(xs[n:]), xs[:n]...)
}

func round(x float64) float64 { return math.Round(x*100) / 100 }

func secs(d time.Duration) string { return strconv.Itoa(int(d.Round(time.Second).Seconds())) }

func mapValues(m map[string]int) []int {
	out := make([]int, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func setSysctls(c *cluster, p *corev1.Pod, kv map[string]string) error {
	for k, v := range kv {
		path := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if _, err := c.inPod(context.Background(), p, 10*time.Second, "sh", "-c", `echo "$1" > "$2"`, "sh", v, path); err != nil {
			return fmt.Errorf("set %s in pod %s: %w", k, p.Name, err)
		}
	}
	return nil
}

// haproxyPids finds the two sidecars by their config files.
func haproxyPids(cfgs ...string) ([]int, error) {
	pids := procs(func(argv []string) bool {
		return filepath.Base(argv[0]) == "haproxy" && slices.ContainsFunc(cfgs, func(c string) bool { return slices.Contains(argv, c) })
	})
	if len(pids) != len(cfgs) {
		return pids, fmt.Errorf("found %d haproxy processes, want %d", len(pids), len(cfgs))
	}
	return pids, nil
}

// warmUp waits until every tool gets through the path (the mesh may need
// a moment for new pods' identities) and primes connection set-up.
func warmUp(ctx context.Context, c *cluster, p benchPath, cfg Config) error {
	deadline := time.Now().Add(2 * time.Minute)
	tries := []func() error{
		func() error {
			_, err := heyRun(ctx, c, p, cfg, "-n", "400", "-c", "2") // enough for a p99
			return err
		},
		func() error {
			_, err := sockperfRun(ctx, c, p, cfg, time.Second)
			return err
		},
		func() error {
			_, err := iperfRun(ctx, c, p, cfg, time.Second)
			return err
		},
	}
	for _, try := range tries {
		for {
			err := try()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("warm-up: %w", err)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
		}
	}
	return nil
}

func iperfRun(ctx context.Context, c *cluster, p benchPath, cfg Config, d time.Duration) (bench.Throughput, error) {
	out, err := c.inPod(ctx, p.client, d+time.Minute, "iperf3", "-c", p.target, "-p", strconv.Itoa(iperfPort),
		"-J", "-t", secs(d), "-P", strconv.Itoa(cfg.Parallel))
	if tp, perr := bench.ParseIperf3(out); perr == nil {
		return tp, nil
	} else if err == nil {
		err = perr
	}
	return bench.Throughput{}, err
}

func sockperfRun(ctx context.Context, c *cluster, p benchPath, cfg Config, d time.Duration) (bench.Latency, error) {
	out, err := c.inPod(ctx, p.client, d+time.Minute, "sockperf", "ping-pong", "--tcp", "-i", p.target, "-p", strconv.Itoa(sockperfPort),
		"-m", strconv.Itoa(cfg.MsgSize), "-t", secs(d), "--full-rtt")
	if err != nil {
		return bench.Latency{}, err
	}
	return bench.ParseSockperf(out)
}

func heyRun(ctx context.Context, c *cluster, p benchPath, cfg Config, load ...string) (bench.HTTPLoad, error) {
	url := fmt.Sprintf("http://%s:%d/", p.target, httpPort)
	args := append(append([]string{"hey"}, load...), "-disable-keepalive", "-t", "10", url)
	out, err := c.inPod(ctx, p.client, 2*time.Minute, args...)
	if err != nil {
		return bench.HTTPLoad{}, err
	}
	l, err := bench.ParseHey(out)
	if err != nil {
		return l, err
	}
	if l.Errors > 0 {
		return l, fmt.Errorf("hey: %d of %d requests failed: %w", l.Errors, l.Errors+l.OK, bench.ErrToolFailed)
	}
	return l, nil
}

// measureThroughput runs iperf3 and counts the proxies' CPU over the whole
// run.
func measureThroughput(ctx context.Context, c *cluster, p benchPath, cfg Config, s *bench.Sample) error {
	var pids []int
	var cpu0 time.Duration
	if p.procs != nil {
		var err error
		if pids, err = p.procs(); err != nil {
			return err
		}
		if cpu0, err = cpuOf(pids); err != nil {
			return err
		}
	}
	tp, err := iperfRun(ctx, c, p, cfg, cfg.Duration)
	if err != nil {
		return err
	}
	s.MBps = tp.MBps()
	if p.procs != nil {
		cpu1, err := cpuOf(pids)
		if err != nil {
			return err
		}
		s.ProxyCPUPerGB = (cpu1 - cpu0).Seconds() / (float64(tp.Bytes) / 1e9)
	}
	return nil
}

func measureRR(ctx context.Context, c *cluster, p benchPath, cfg Config, s *bench.Sample) error {
	l, err := sockperfRun(ctx, c, p, cfg, cfg.RRDuration)
	if err != nil {
		return err
	}
	if !l.RoundTrip {
		return errors.New("sockperf did not report full round trips")
	}
	s.RRP50, s.RRP99 = l.P50, l.P99
	return nil
}

func measureConns(ctx context.Context, c *cluster, p benchPath, cfg Config, s *bench.Sample) error {
	l, err := heyRun(ctx, c, p, cfg, "-z", secs(cfg.ConnDuration)+"s", "-c", strconv.Itoa(cfg.Clients))
	if err != nil {
		return err
	}
	s.ConnPerSec = l.ConnsPerSec()
	s.ConnP50 = float64(l.P50) / float64(time.Millisecond)
	s.ConnP99 = float64(l.P99) / float64(time.Millisecond)
	return nil
}
