package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/tunmesh/tunmesh/tools/internal/bench"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

const echoPort = 7

// settle is how long the agents get after a step before their memory is
// read (pod set-up and connection set-up garbage is collected by then).
const settle = 10 * time.Second

// memProfileTop is how many entries of each agent profile the memory report
// lists.
const memProfileTop = 8

// runMemory measures the agents' RSS at 0, half and all of cfg.Pods meshed
// pods (half on each node), then with all pods at half and all of cfg.Idle
// idle cross-node connections, and fits the growth per pod and per
// connection.
func runMemory(ctx context.Context, c *cluster, cfg Config, report io.Writer, log *slog.Logger) error {
	if err := c.namespace(ctx, "bench-mem"); err != nil {
		return err
	}
	var points []bench.MemoryPoint
	measure := func(pods, conns int) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(settle):
		}
		pt, err := c.memoryPoint(ctx, pods, conns)
		if err != nil {
			return err
		}
		log.Info("memory", "pods", pods, "conns", conns, "agent_rss_mib", pt.RSSMB)
		points = append(points, pt)
		return nil
	}
	if err := measure(0, 0); err != nil {
		return err
	}
	name := func(i int) string { return fmt.Sprintf("mem-%03d", i) }
	// Even pods on node-1, odd on node-2: neighbours are cross-node.
	node := func(i int) string { return "node-" + strconv.Itoa(1+i%2) }
	var names []string
	for _, upto := range []int{cfg.Pods / 2, cfg.Pods} {
		start := len(names)
		for i := start; i < upto; i++ {
			if err := c.createPod(ctx, podSpec{name: name(i), node: node(i), sa: "bench-mem", meshed: true,
				containers: [][]string{{"tunmesh-workload", "echo", "--listen", ":" + strconv.Itoa(echoPort)}}}); err != nil {
				return err
			}
			names = append(names, name(i))
		}
		t0 := time.Now()
		if _, err := c.waitRunning(ctx, 5*time.Minute, names...); err != nil {
			return err
		}
		log.Info("pods running", "pods", upto, "took", time.Since(t0).Round(100*time.Millisecond))
		if err := measure(upto, 0); err != nil {
			return err
		}
	}
	pods, err := c.waitRunning(ctx, time.Minute, names...)
	if err != nil {
		return err
	}

	// Connection k goes from pod k%P to its neighbour (k+1)%P, on the
	// other node; a one-byte echo proves it reaches the server before it
	// is left idle. The conns belong to this function and close with it.
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	defer func() {
		for _, cn := range conns {
			cn.Close()
		}
	}()
	open := func(from, to int) error {
		src, dst := pods[names[from]], pods[names[to]]
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cn, err := namedns.DialContext(dctx, c.podNetns(src), "tcp", net.JoinHostPort(dst.Status.PodIP, strconv.Itoa(echoPort)))
		if err != nil {
			return err
		}
		mu.Lock()
		conns = append(conns, cn)
		mu.Unlock()
		_ = cn.SetDeadline(time.Now().Add(30 * time.Second))
		b := []byte{'x'}
		if _, err := cn.Write(b); err != nil {
			return fmt.Errorf("write to %s: %w", dst.Name, err)
		}
		if _, err := io.ReadFull(cn, b); err != nil {
			return fmt.Errorf("echo from %s: %w", dst.Name, err)
		}
		return cn.SetDeadline(time.Time{})
	}
	for _, upto := range []int{cfg.Idle / 2, cfg.Idle} {
		t0 := time.Now()
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(8)
		for k := len(conns); k < upto; k++ {
			if gctx.Err() != nil {
				break
			}
			g.Go(func() error { return open(k%len(names), (k+1)%len(names)) })
		}
		if err := g.Wait(); err != nil {
			return fmt.Errorf("open idle connections: %w", err)
		}
		log.Info("idle connections open", "conns", upto, "took", time.Since(t0).Round(100*time.Millisecond))
		if err := measure(cfg.Pods, upto); err != nil {
			return err
		}
	}
	// At the last point, still under load: where the goroutines and the
	// heap are.
	var profiles []bench.AgentProfile
	if cfg.Profile {
		profiles = c.agentProfiles(ctx)
	}
	r := bench.EvaluateMemory(points, len(c.state.Nodes), cfg.LimitMB)
	fmt.Fprintf(report, "settings: %d meshed pods (tunmesh-workload echo) spread over %d nodes, %d idle cross-node meshed connections (one echo each, then held open), agent RSS read %s after each step\n\n",
		cfg.Pods, len(c.state.Nodes), cfg.Idle, settle)
	if err := bench.WriteMemory(report, r); err != nil {
		return err
	}
	return bench.WriteProfiles(report, profiles, memProfileTop)
}

// memoryPoint reads every agent's VmRSS, its smaps_rollup and, when
// exported, its memory metrics.
func (c *cluster) memoryPoint(ctx context.Context, pods, conns int) (bench.MemoryPoint, error) {
	pt := bench.MemoryPoint{Pods: pods, Conns: conns, RSSMB: map[string]float64{}, Metrics: map[string]bench.AgentMetrics{},
		Smaps: map[string]bench.Smaps{}}
	agents, err := c.agentPids()
	if err != nil {
		return pt, err
	}
	for node, pid := range agents {
		v, err := rssMB(pid)
		if err != nil {
			return pt, err
		}
		pt.RSSMB[node] = v
		s, err := smaps(pid)
		if err != nil {
			return pt, err
		}
		pt.Smaps[node] = s
		if m, ok := c.agentMetrics(ctx, node); ok {
			pt.Metrics[node] = m
		}
	}
	return pt, nil
}
