package bench

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestPercentile(t *testing.T) {
	nan := math.NaN()
	for _, tc := range []struct {
		xs   []float64
		p    float64
		want float64
	}{
		{[]float64{3, 1, 2}, 50, 2},
		{[]float64{4, 1, 3, 2}, 50, 2.5},
		{[]float64{1, nan, 3}, 50, 2},
		{[]float64{1, 2, 3, 4, 5}, 0, 1},
		{[]float64{1, 2, 3, 4, 5}, 100, 5},
		{[]float64{1, 2, 3, 4, 5}, 25, 2},
		{[]float64{10, 20}, 99, 19.9},
		{[]float64{7}, 99, 7},
	} {
		if got := Percentile(tc.xs, tc.p); !near(got, tc.want, 1e-9) {
			t.Errorf("Percentile(%v, %v) = %v, want %v", tc.xs, tc.p, got, tc.want)
		}
	}
	if !math.IsNaN(Median(nil)) || !math.IsNaN(Median([]float64{nan})) {
		t.Error("median of nothing is not NaN")
	}
}

func TestFit(t *testing.T) {
	f, ok := Fit([]float64{0, 50, 100}, []float64{20, 45, 70})
	if !ok || !near(f.Slope, 0.5, 1e-9) || !near(f.Intercept, 20, 1e-9) {
		t.Errorf("got %+v %v", f, ok)
	}
	if _, ok := Fit([]float64{1, 1}, []float64{2, 3}); ok {
		t.Error("fit with one distinct x")
	}
	if _, ok := Fit([]float64{1}, []float64{2}); ok {
		t.Error("fit with one point")
	}
}

// The issue's own table: tunmesh misses every target against HAProxy.
func issueTable() []Summary {
	return []Summary{
		Summarize(Kernel, []Sample{{MBps: 1900, RRP50: 30, RRP99: 50, ConnPerSec: 5500, ConnP50: 1, ConnP99: 2, ProxyCPUPerGB: math.NaN()}}, math.NaN()),
		Summarize(HAProxy, []Sample{{MBps: 420, RRP50: 68, RRP99: 122, ConnPerSec: 850, ConnP50: 8, ConnP99: 20, ProxyCPUPerGB: 2}, {MBps: 560, RRP50: 68, RRP99: 122, ConnPerSec: 850, ConnP50: 8, ConnP99: 20, ProxyCPUPerGB: 2}}, 12),
		Summarize(Tunmesh, []Sample{{MBps: 357, RRP50: 160, RRP99: 275, ConnPerSec: 650, ConnP50: 11, ConnP99: 30, ProxyCPUPerGB: 3}}, 40),
	}
}

func TestEvaluate(t *testing.T) {
	sums := issueTable()
	if sums[1].MBps != 490 || sums[1].Runs != 2 || sums[1].Min.MBps != 420 || sums[1].Max.MBps != 560 {
		t.Fatalf("haproxy summary %+v", sums[1])
	}
	got := Evaluate(sums)
	want := []struct {
		target string
		ratio  float64
		status string
	}{
		{"throughput >= 1.5x haproxy", 357.0 / 490, "MISS"},
		{"throughput >= 0.5x kernel", 357.0 / 1900, "MISS"},
		{"RR p50 <= 1x haproxy", 160.0 / 68, "MISS"},
		{"RR p99 <= 1x haproxy", 275.0 / 122, "MISS"},
		{"new conn/s >= 3x haproxy", 650.0 / 850, "MISS"},
		{"CPU per GB <= 1x haproxy", 1.5, "MISS"},
	}
	if len(got) != len(want) {
		t.Fatalf("%d verdicts, want %d", len(got), len(want))
	}
	for i, w := range want {
		if got[i].Target != w.target || !near(got[i].Ratio, w.ratio, 1e-9) || got[i].Status() != w.status {
			t.Errorf("verdict %d = %+v (%s), want %+v", i, got[i], got[i].Status(), w)
		}
	}

	// Meeting every bound exactly passes.
	sums[2].Sample = Sample{MBps: 950, RRP50: 68, RRP99: 122, ConnPerSec: 2550, ProxyCPUPerGB: 2}
	for _, v := range Evaluate(sums) {
		if v.Status() != "PASS" {
			t.Errorf("%s: %s (ratio %v)", v.Target, v.Status(), v.Ratio)
		}
	}
}

// TestEvaluateWireGuardPeers: the WireGuard references are judged only
// when they were measured, tunmesh against each.
func TestEvaluateWireGuardPeers(t *testing.T) {
	sums := issueTable()
	if got, want := len(Evaluate(sums)), 6; got != want {
		t.Fatalf("%d verdicts without the WireGuard paths, want %d", got, want)
	}
	sums = append(sums,
		Summary{Path: WireGuardGo, Runs: 1, Sample: Sample{MBps: 400, ProxyCPUPerGB: 3.5}},
		Summary{Path: HAProxyWireGuardGo, Runs: 1, Sample: Sample{MBps: 250, ProxyCPUPerGB: 6}})
	sums[2].MBps, sums[2].ProxyCPUPerGB = 300, 5 // tunmesh over WireGuard
	got := Evaluate(sums)
	want := map[string]struct {
		ratio  float64
		status string
	}{
		"throughput >= 1x wireguard-go":         {300.0 / 400, "MISS"},
		"throughput >= 1x haproxy+wireguard-go": {300.0 / 250, "PASS"},
		"CPU per GB <= 1x haproxy+wireguard-go": {5.0 / 6, "PASS"},
	}
	seen := 0
	for _, v := range got {
		w, ok := want[v.Target]
		if !ok {
			continue
		}
		seen++
		if !near(v.Ratio, w.ratio, 1e-9) || v.Status() != w.status {
			t.Errorf("%s: ratio %v (%s), want %v (%s)", v.Target, v.Ratio, v.Status(), w.ratio, w.status)
		}
	}
	if seen != len(want) {
		t.Errorf("%d of the %d WireGuard verdicts present:\n%+v", seen, len(want), got)
	}
}

func TestEvaluateMissingIsNotAPass(t *testing.T) {
	sums := issueTable()
	sums[2].ProxyCPUPerGB = math.NaN()
	got := Evaluate(sums[1:]) // no kernel row
	for _, v := range got {
		switch v.Target {
		case "throughput >= 0.5x kernel", "CPU per GB <= 1x haproxy":
			if v.Status() != "n/a" || v.Pass {
				t.Errorf("%s: %s", v.Target, v.Status())
			}
		}
	}
}

func TestWriteTable(t *testing.T) {
	var b strings.Builder
	sums := issueTable()
	if err := WriteTable(&b, sums, Evaluate(sums)); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"| kernel | 1 | 1900 | 30 / 50 | 5500 | 1.0 / 2.0 | - | - |",
		"| haproxy | 2 | 490 | 68 / 122 | 850 | 8.0 / 20.0 | 2.00 | 12.0 |",
		"| throughput >= 1.5x haproxy | 0.73 | MISS |",
		"| new conn/s >= 3x haproxy | 0.76 | MISS |",
		"| haproxy | 420–560 | 68–68 | 122–122 | 850–850 | 2.00–2.00 |",
		"| kernel | 1900–1900 | 30–30 | 50–50 | 5500–5500 | - |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestEvaluateMemory(t *testing.T) {
	// Two nodes; each agent grows 0.2 MiB per pod on its node and
	// 0.01 MiB per connection end.
	pt := func(pods, conns int) MemoryPoint {
		perNode := 20 + 0.2*float64(pods)/2 + 0.01*float64(conns)*2/2
		// 15 MiB of it is the binary's pages; the rest anonymous.
		anon := int64((perNode - 15) * (1 << 20))
		return MemoryPoint{Pods: pods, Conns: conns, RSSMB: map[string]float64{"node-1": perNode, "node-2": perNode + 1},
			Metrics: map[string]AgentMetrics{"node-1": {RSSMB: perNode, HeapMB: 10, StackMB: 2, Goroutines: 300}},
			Smaps: map[string]Smaps{
				"node-1": {RSS: int64(perNode * (1 << 20)), Anon: anon, File: 15 << 20, PSSFile: 15 << 19},
				"node-2": {RSS: int64((perNode + 1) * (1 << 20)), Anon: anon + 1<<20, File: 15 << 20, PSSFile: -1},
			}}
	}
	pts := []MemoryPoint{pt(0, 0), pt(50, 0), pt(100, 0), pt(100, 500), pt(100, 1000)}
	r := EvaluateMemory(pts, 2, 64)
	if !near(r.PerPodKB, 0.2*1024, 1e-6) || !near(r.PerConnKB, 0.01*1024, 1e-6) {
		t.Errorf("fit %v KiB/pod %v KiB/conn", r.PerPodKB, r.PerConnKB)
	}
	// The file part is constant: anonymous memory grows alike (to the
	// rounding of bytes).
	if !near(r.AnonPerPodKB, 0.2*1024, 1e-3) || !near(r.AnonPerConnKB, 0.01*1024, 1e-3) {
		t.Errorf("anon fit %v KiB/pod %v KiB/conn", r.AnonPerPodKB, r.AnonPerConnKB)
	}
	// last point: 20 + 10 + 10 + 1 = 41 MiB
	if !r.Pass {
		t.Errorf("41 MiB reported over 64")
	}
	if r := EvaluateMemory(pts, 2, 40); r.Pass {
		t.Errorf("41 MiB reported under 40")
	}
	var b strings.Builder
	if err := WriteMemory(&b, r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| 100 | 1000 | node-1 | 40.0 | 25.0 | 15.0 (7.5) | 40.0 | 10.0 | 2.0 | 300 |",
		"| 100 | 1000 | node-2 | 41.0 | 26.0 | 15.0 | - | - | - | - |",
		"204.8 KiB per pod", "10.2 KiB per connection end", "(largest: 41.0 MiB): PASS",
		"of which anonymous memory (smaps_rollup): 204.8 KiB per pod, 10.2 KiB per connection end",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("memory report lacks %q:\n%s", want, b.String())
		}
	}
}

func TestParseAgentMetrics(t *testing.T) {
	m := ParseAgentMetrics([]byte(`go_goroutines 412
go_memstats_heap_inuse_bytes 1.048576e+07
go_memstats_stack_inuse_bytes 2.097152e+06
process_resident_memory_bytes 4.194304e+07
`))
	if m.Goroutines != 412 || m.HeapMB != 10 || m.StackMB != 2 || m.RSSMB != 40 {
		t.Errorf("got %+v", m)
	}
	if m := ParseAgentMetrics([]byte("go_goroutines 3\n")); !math.IsNaN(m.RSSMB) || m.Goroutines != 3 {
		t.Errorf("missing figures: %+v", m)
	}
}

func TestEvaluateMemoryWithoutSmaps(t *testing.T) {
	pts := []MemoryPoint{
		{Pods: 0, RSSMB: map[string]float64{"node-1": 30}},
		{Pods: 100, RSSMB: map[string]float64{"node-1": 40}},
	}
	r := EvaluateMemory(pts, 1, 64)
	if !near(r.PerPodKB, 10*1024/100.0, 1e-9) || !math.IsNaN(r.AnonPerPodKB) {
		t.Errorf("per pod %v, anon %v (want NaN without smaps)", r.PerPodKB, r.AnonPerPodKB)
	}
	var b strings.Builder
	if err := WriteMemory(&b, r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "| 100 | 0 | node-1 | 40.0 | - | - |") || !strings.Contains(b.String(), "anonymous memory (smaps_rollup): - KiB per pod") {
		t.Errorf("report:\n%s", b.String())
	}
}

func TestWriteProfiles(t *testing.T) {
	var b strings.Builder
	err := WriteProfiles(&b, []AgentProfile{
		{Node: "node-1", GoroutineTotal: 3, Goroutines: []ProfileEntry{{Func: "a", Count: 2}, {Func: "b", Count: 1}},
			HeapTotal: 3 << 20, Heap: []ProfileEntry{{Func: "h", Count: 1, Bytes: 2 << 20}, {Func: "i", Count: 1, Bytes: 1 << 20}}},
		{Node: "node-2", GoroutineErr: errors.New("refused"), HeapErr: errors.New("refused")},
	}, 1)
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"node-1 by innermost tunmesh function (/debug/pprof/goroutine): 3 in all", "- 2 `a`", "3.0 MiB in all", "- 2048 KiB `h`", "node-2 by innermost tunmesh function (/debug/pprof/goroutine): not read: refused"} {
		if !strings.Contains(out, want) {
			t.Errorf("lacks %q:\n%s", want, out)
		}
	}
	for _, unwanted := range []string{"`b`", "`i`"} {
		if strings.Contains(out, unwanted) {
			t.Errorf("top 1 lists %s:\n%s", unwanted, out)
		}
	}
}
