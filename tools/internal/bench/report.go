package bench

import (
	"fmt"
	"io"
	"math"
	"strings"
)

// The paths compared, in table order.
const (
	Kernel  = "kernel"  // pods opted out of the mesh: veth, bridge, route
	HAProxy = "haproxy" // opted-out pods, each with an HAProxy mTLS sidecar
	Tunmesh = "tunmesh" // meshed pods
	// WireGuardGo is opted-out pods joined by a wireguard-go pair with
	// kernel TUN devices (make bench --transport wireguard): the reference
	// of tunmesh over WireGuard.
	WireGuardGo = "wireguard-go"
	// HAProxyWireGuardGo is the HAProxy mTLS sidecar pair talking through
	// the wireguard-go pair: the sidecar model over WireGuard, the same
	// work per byte as tunmesh over WireGuard (mTLS inside WireGuard).
	HAProxyWireGuardGo = "haproxy+wireguard-go"
)

// Sample is one repetition of the three measurements on one path. A
// figure that was not measured is NaN.
type Sample struct {
	MBps             float64 // iperf3 receiver throughput, 10^6 bytes/s
	RRP50, RRP99     float64 // sockperf ping-pong round trip, µs
	ConnPerSec       float64 // new connections (requests without keep-alive) per second
	ConnP50, ConnP99 float64 // latency of those requests, ms
	// ProxyCPUPerGB is the CPU seconds the path's proxies (both agents,
	// both HAProxy processes, both wireguard-go processes, or all four of
	// those over WireGuard) spent per GB (10^9 bytes) during the
	// throughput test; NaN for the kernel path, which has none.
	ProxyCPUPerGB float64
}

// NaNSample has every figure unmeasured.
func NaNSample() Sample {
	n := math.NaN()
	return Sample{n, n, n, n, n, n, n}
}

// Summary is the median of every figure over a path's repetitions, and
// their range.
type Summary struct {
	Path string
	Runs int
	Sample
	Min, Max Sample
	// ProxyRSSMB is the largest resident set of one proxy process (an
	// agent, or an HAProxy) at the end of the run, MiB; NaN if none.
	ProxyRSSMB float64
}

// Summarize takes medians (and minima and maxima) over samples.
func Summarize(path string, samples []Sample, proxyRSSMB float64) Summary {
	over := func(p float64) Sample {
		col := func(get func(Sample) float64) float64 {
			xs := make([]float64, len(samples))
			for i, s := range samples {
				xs[i] = get(s)
			}
			return Percentile(xs, p)
		}
		return Sample{
			MBps:          col(func(s Sample) float64 { return s.MBps }),
			RRP50:         col(func(s Sample) float64 { return s.RRP50 }),
			RRP99:         col(func(s Sample) float64 { return s.RRP99 }),
			ConnPerSec:    col(func(s Sample) float64 { return s.ConnPerSec }),
			ConnP50:       col(func(s Sample) float64 { return s.ConnP50 }),
			ConnP99:       col(func(s Sample) float64 { return s.ConnP99 }),
			ProxyCPUPerGB: col(func(s Sample) float64 { return s.ProxyCPUPerGB }),
		}
	}
	return Summary{Path: path, Runs: len(samples), Sample: over(50), Min: over(0), Max: over(100), ProxyRSSMB: proxyRSSMB}
}

// Verdict is one target of issue #8 checked against a run.
type Verdict struct {
	Target string  // e.g. "throughput >= 1.5x haproxy"
	Ratio  float64 // tunmesh / reference; NaN when a figure is missing
	Pass   bool
}

// Status is PASS, MISS, or n/a when a figure is missing.
func (v Verdict) Status() string {
	switch {
	case math.IsNaN(v.Ratio):
		return "n/a"
	case v.Pass:
		return "PASS"
	}
	return "MISS"
}

// target is a ratio tunmesh/reference with a bound.
type target struct {
	name    string
	ref     string // the reference path
	get     func(Summary) float64
	bound   float64
	atLeast bool // ratio >= bound, else ratio <= bound
	// optional targets are left out when their reference path was not
	// measured (WireGuardGo and HAProxyWireGuardGo run only with
	// --transport wireguard).
	optional bool
}

var targets = []target{
	{name: "throughput", ref: HAProxy, get: func(s Summary) float64 { return s.MBps }, bound: 1.5, atLeast: true},
	{name: "throughput", ref: Kernel, get: func(s Summary) float64 { return s.MBps }, bound: 0.5, atLeast: true},
	{name: "RR p50", ref: HAProxy, get: func(s Summary) float64 { return s.RRP50 }, bound: 1, atLeast: false},
	{name: "RR p99", ref: HAProxy, get: func(s Summary) float64 { return s.RRP99 }, bound: 1, atLeast: false},
	{name: "new conn/s", ref: HAProxy, get: func(s Summary) float64 { return s.ConnPerSec }, bound: 3, atLeast: true},
	{name: "CPU per GB", ref: HAProxy, get: func(s Summary) float64 { return s.ProxyCPUPerGB }, bound: 1, atLeast: false},
	{name: "throughput", ref: WireGuardGo, get: func(s Summary) float64 { return s.MBps }, bound: 1, atLeast: true, optional: true},
	// Against the sidecar model over WireGuard: the peer that does the
	// same work (not an issue's target; tunmesh aims to beat the sidecar
	// model, and this is that model on the WireGuard transport).
	{name: "throughput", ref: HAProxyWireGuardGo, get: func(s Summary) float64 { return s.MBps }, bound: 1, atLeast: true, optional: true},
	{name: "CPU per GB", ref: HAProxyWireGuardGo, get: func(s Summary) float64 { return s.ProxyCPUPerGB }, bound: 1, atLeast: false, optional: true},
}

// Evaluate checks tunmesh against the references for the targets of
// issue #8. Summaries are looked up by Path; a missing path or figure
// gives a NaN ratio (n/a), never a PASS.
func Evaluate(sums []Summary) []Verdict {
	by := map[string]Summary{}
	for _, s := range sums {
		by[s.Path] = s
	}
	var out []Verdict
	for _, t := range targets {
		op := "<="
		if t.atLeast {
			op = ">="
		}
		v := Verdict{Target: fmt.Sprintf("%s %s %gx %s", t.name, op, t.bound, t.ref), Ratio: math.NaN()}
		tm, ok1 := by[Tunmesh]
		ref, ok2 := by[t.ref]
		if t.optional && !ok2 {
			continue
		}
		if ok1 && ok2 {
			a, b := t.get(tm), t.get(ref)
			if !math.IsNaN(a) && !math.IsNaN(b) && b != 0 {
				v.Ratio = a / b
				if t.atLeast {
					v.Pass = v.Ratio >= t.bound
				} else {
					v.Pass = v.Ratio <= t.bound
				}
			}
		}
		out = append(out, v)
	}
	return out
}

// num formats x with prec decimals, or "-" when it was not measured.
func num(x float64, prec int) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "-"
	}
	return fmt.Sprintf("%.*f", prec, x)
}

// WriteTable prints the comparison table and the verdicts as Markdown
// (readable in a terminal, pasteable into docs/performance.md).
func WriteTable(w io.Writer, sums []Summary, verdicts []Verdict) error {
	var b strings.Builder
	b.WriteString("| path | runs | MB/s | RR p50 / p99 µs | new conn/s | conn p50 / p99 ms | proxy CPU s/GB | proxy RSS MiB |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|\n")
	for _, s := range sums {
		fmt.Fprintf(&b, "| %s | %d | %s | %s / %s | %s | %s / %s | %s | %s |\n", s.Path, s.Runs,
			num(s.MBps, 0), num(s.RRP50, 0), num(s.RRP99, 0), num(s.ConnPerSec, 0),
			num(s.ConnP50, 1), num(s.ConnP99, 1), num(s.ProxyCPUPerGB, 2), num(s.ProxyRSSMB, 1))
	}
	// The range shows how noisy the machine was: a target whose ratio
	// sits inside the ranges' overlap needs a quieter machine or more
	// repetitions.
	b.WriteString("\nrange over the repetitions (min–max):\n\n| path | MB/s | RR p50 µs | RR p99 µs | new conn/s | proxy CPU s/GB |\n|---|---|---|---|---|---|\n")
	for _, s := range sums {
		rng := func(get func(Sample) float64, prec int) string {
			lo, hi := get(s.Min), get(s.Max)
			if math.IsNaN(lo) && math.IsNaN(hi) {
				return "-"
			}
			return num(lo, prec) + "–" + num(hi, prec)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", s.Path,
			rng(func(x Sample) float64 { return x.MBps }, 0), rng(func(x Sample) float64 { return x.RRP50 }, 0),
			rng(func(x Sample) float64 { return x.RRP99 }, 0), rng(func(x Sample) float64 { return x.ConnPerSec }, 0),
			rng(func(x Sample) float64 { return x.ProxyCPUPerGB }, 2))
	}
	b.WriteString("\n| target (tunmesh vs) | ratio | result |\n|---|---|---|\n")
	for _, v := range verdicts {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", v.Target, num(v.Ratio, 2), v.Status())
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// MemoryPoint is the agents' memory at one load.
type MemoryPoint struct {
	Pods, Conns int
	// RSSMB is each node's agent VmRSS, MiB, by node name.
	RSSMB map[string]float64
	// Metrics is what each agent's /metrics says about its memory, by node
	// name, when it answers.
	Metrics map[string]AgentMetrics
	// Smaps is each agent's smaps_rollup, by node name, when readable:
	// how much of the RSS is anonymous memory and how much mapped files.
	Smaps map[string]Smaps
}

// AgentMetrics are an agent's own memory figures from its /metrics (Go
// and process collectors); NaN when not exported.
type AgentMetrics struct {
	RSSMB      float64 // process_resident_memory_bytes
	HeapMB     float64 // go_memstats_heap_inuse_bytes
	StackMB    float64 // go_memstats_stack_inuse_bytes
	Goroutines float64 // go_goroutines
}

// ParseAgentMetrics takes an agent's memory figures from its Prometheus
// text exposition.
func ParseAgentMetrics(text []byte) AgentMetrics {
	get := func(name string, scale float64) float64 {
		v, ok := PromValue(text, name)
		if !ok {
			return math.NaN()
		}
		return v / scale
	}
	return AgentMetrics{
		RSSMB:      get("process_resident_memory_bytes", 1<<20),
		HeapMB:     get("go_memstats_heap_inuse_bytes", 1<<20),
		StackMB:    get("go_memstats_stack_inuse_bytes", 1<<20),
		Goroutines: get("go_goroutines", 1),
	}
}

// MaxRSS is the largest agent RSS of the point, MiB.
func (p MemoryPoint) MaxRSS() float64 {
	m := math.NaN()
	for _, v := range p.RSSMB {
		if math.IsNaN(m) || v > m {
			m = v
		}
	}
	return m
}

// MemoryReport is the result of the memory mode.
type MemoryReport struct {
	Points []MemoryPoint
	// PerPodKB and PerConnKB are the fitted growth of one agent's RSS, KiB
	// per pod on its node and per connection through it (NaN when the
	// points do not allow a fit).
	PerPodKB, PerConnKB float64
	// AnonPerPodKB and AnonPerConnKB are the same fits of the anonymous
	// part of the RSS alone (NaN without smaps_rollup).
	AnonPerPodKB, AnonPerConnKB float64
	LimitMB                     float64
	Pass                        bool // every node's RSS at the last point <= LimitMB
}

// EvaluateMemory fits the growth per pod (points without connections,
// per node: pods/2 on each of two nodes) and per connection (points at the
// largest pod count; each connection crosses two agents, one end each), and
// checks the last point against limitMB per node. nodes is the number of
// nodes the pods are spread over.
func EvaluateMemory(points []MemoryPoint, nodes int, limitMB float64) MemoryReport {
	r := MemoryReport{Points: points, LimitMB: limitMB, PerPodKB: math.NaN(), PerConnKB: math.NaN(),
		AnonPerPodKB: math.NaN(), AnonPerConnKB: math.NaN()}
	if nodes < 1 || len(points) == 0 {
		return r
	}
	maxPods := 0
	for _, p := range points {
		maxPods = max(maxPods, p.Pods)
	}
	// Mean agent RSS (or anonymous RSS) per node, KiB, against the load
	// one agent carries; ok is false when a node lacks the figure.
	mean := func(p MemoryPoint, anon bool) (float64, bool) {
		var s float64
		for n, v := range p.RSSMB {
			if anon {
				sm, ok := p.Smaps[n]
				if !ok {
					return 0, false
				}
				v = float64(sm.Anon) / (1 << 20)
			}
			s += v
		}
		return s / float64(len(p.RSSMB)) * 1024, len(p.RSSMB) > 0
	}
	fit := func(anon bool) (perPod, perConn float64) {
		perPod, perConn = math.NaN(), math.NaN()
		var px, py, cx, cy []float64
		for _, p := range points {
			y, ok := mean(p, anon)
			if !ok {
				continue
			}
			if p.Conns == 0 {
				px = append(px, float64(p.Pods)/float64(nodes))
				py = append(py, y)
			}
			if p.Pods == maxPods {
				// each connection has its client end on one agent and its
				// server end on the other: 2 ends per connection over nodes.
				cx = append(cx, float64(p.Conns)*2/float64(nodes))
				cy = append(cy, y)
			}
		}
		if f, ok := Fit(px, py); ok {
			perPod = f.Slope
		}
		if f, ok := Fit(cx, cy); ok {
			perConn = f.Slope
		}
		return perPod, perConn
	}
	r.PerPodKB, r.PerConnKB = fit(false)
	r.AnonPerPodKB, r.AnonPerConnKB = fit(true)
	last := points[len(points)-1]
	r.Pass = len(last.RSSMB) > 0 && last.MaxRSS() <= limitMB
	return r
}

// WriteMemory prints the memory table (a row per point and node) and the
// fit as Markdown.
func WriteMemory(w io.Writer, r MemoryReport) error {
	var b strings.Builder
	b.WriteString("| pods | idle conns | node | agent VmRSS MiB | anon MiB | file MiB (PSS) | metrics RSS MiB | Go heap in use MiB | Go stacks MiB | goroutines |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.Points {
		names := make([]string, 0, len(p.RSSMB))
		for n := range p.RSSMB {
			names = append(names, n)
		}
		sortStrings(names)
		for _, n := range names {
			m, ok := p.Metrics[n]
			if !ok {
				m = AgentMetrics{math.NaN(), math.NaN(), math.NaN(), math.NaN()}
			}
			anon, file := "-", "-"
			if sm, ok := p.Smaps[n]; ok {
				anon = num(float64(sm.Anon)/(1<<20), 1)
				file = num(float64(sm.File)/(1<<20), 1)
				if sm.PSSFile >= 0 {
					file += " (" + num(float64(sm.PSSFile)/(1<<20), 1) + ")"
				}
			}
			fmt.Fprintf(&b, "| %d | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", p.Pods, p.Conns, n,
				num(p.RSSMB[n], 1), anon, file, num(m.RSSMB, 1), num(m.HeapMB, 1), num(m.StackMB, 1), num(m.Goroutines, 0))
		}
	}
	status := "MISS"
	if r.Pass {
		status = "PASS"
	}
	fmt.Fprintf(&b, "\n- growth per agent (least squares over the points): %s KiB per pod on its node, %s KiB per connection end\n"+
		"- of which anonymous memory (smaps_rollup): %s KiB per pod, %s KiB per connection end\n"+
		"- target: agent RSS <= %.0f MiB per node at the last point (largest: %s MiB): %s\n",
		num(r.PerPodKB, 1), num(r.PerConnKB, 1), num(r.AnonPerPodKB, 1), num(r.AnonPerConnKB, 1), r.LimitMB, num(r.Points[len(r.Points)-1].MaxRSS(), 1), status)
	_, err := io.WriteString(w, b.String())
	return err
}

// AgentProfile is where one agent's goroutines and heap were at one point,
// from its /debug/pprof (see ParseGoroutineProfile, ParseHeapProfile).
type AgentProfile struct {
	Node                  string
	Goroutines            []ProfileEntry
	GoroutineTotal        float64
	Heap                  []ProfileEntry
	HeapTotal             float64 // bytes, scaled estimate
	HeapErr, GoroutineErr error   // why a profile is missing
}

// WriteProfiles prints the top n entries of each agent's profiles as
// Markdown lists.
func WriteProfiles(w io.Writer, ps []AgentProfile, n int) error {
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "\nGoroutines of the agent on %s by innermost tunmesh function (/debug/pprof/goroutine):", p.Node)
		if p.GoroutineErr != nil {
			fmt.Fprintf(&b, " not read: %v\n", p.GoroutineErr)
		} else {
			fmt.Fprintf(&b, " %.0f in all\n\n", p.GoroutineTotal)
			for i, e := range p.Goroutines {
				if i == n {
					break
				}
				fmt.Fprintf(&b, "- %.0f `%s`\n", e.Count, e.Func)
			}
		}
		// The heap profile is of the last GC: what was live then. "Go heap
		// in use" in the table also counts garbage not yet collected.
		fmt.Fprintf(&b, "\nLive heap at the last GC on %s by where it was allocated (/debug/pprof/heap; sampled, so estimates):", p.Node)
		if p.HeapErr != nil {
			fmt.Fprintf(&b, " not read: %v\n", p.HeapErr)
			continue
		}
		fmt.Fprintf(&b, " %.1f MiB in all\n\n", p.HeapTotal/(1<<20))
		for i, e := range p.Heap {
			if i == n {
				break
			}
			fmt.Fprintf(&b, "- %.0f KiB `%s`\n", e.Bytes/1024, e.Func)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}
