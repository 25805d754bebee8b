package bench

import (
	"math"
	"os"
	"strings"
	"testing"
)

// The testdata profiles were captured from a stand-in cluster's agent
// (tunmesh-bench --mode memory): the goroutine one at 100 pods and 1,000
// idle connections, the heap one at 50 pods. The expected figures were
// computed from the files with awk and Python, not with this code.

func TestParseGoroutineProfile(t *testing.T) {
	text, err := os.ReadFile("testdata/goroutine-agent-debug1.txt")
	if err != nil {
		t.Fatal(err)
	}
	top, total, err := ParseGoroutineProfile(text)
	if err != nil {
		t.Fatal(err)
	}
	if total != 2143 {
		t.Errorf("total %v, want 2143", total)
	}
	want := []ProfileEntry{
		{Func: "node/tunnel.(*splice).copyAdaptive", Count: 1000},
		{Func: "node/tunnel/mux.(*Stream).DrainTo", Count: 1000},
		{Func: "netstack.(*tunReader).next", Count: 50},
	}
	if len(top) < len(want) {
		t.Fatalf("%d entries: %+v", len(top), top)
	}
	for i, w := range want {
		if top[i] != w {
			t.Errorf("entry %d: %+v, want %+v", i, top[i], w)
		}
	}
	var sum float64
	for _, e := range top {
		sum += e.Count
	}
	if sum != total {
		t.Errorf("entries sum to %v, total %v", sum, total)
	}
}

func TestParseHeapProfile(t *testing.T) {
	text, err := os.ReadFile("testdata/heap-agent-debug1.txt")
	if err != nil {
		t.Fatal(err)
	}
	top, total, err := ParseHeapProfile(text)
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(total-6215244) > 1 {
		t.Errorf("total %.0f B, want 6215244 (scaled)", total)
	}
	want := []struct {
		fn    string
		bytes float64
	}{
		{"netstack.(*Stack).createNIC", 1050017},
		{"compress/flate.NewWriter", 924248},
		{"netstack.init.func2", 562016},
	}
	for i, w := range want {
		if top[i].Func != w.fn || math.Abs(top[i].Bytes-w.bytes) > 1 {
			t.Errorf("entry %d: %+v, want %s %.0f B", i, top[i], w.fn, w.bytes)
		}
	}
}

func TestParseProfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		heap bool
		in   string
	}{
		{name: "goroutine empty", in: ""},
		{name: "goroutine no records", in: "goroutine profile: total 0\n"},
		{name: "goroutine bad count", in: "x @ 0x1\n#\t0x1\tmain.f+0x1\t/a.go:1\n"},
		{name: "heap no header", heap: true, in: "1: 2 [3: 4] @ 0x1\n"},
		{name: "heap bad rate", heap: true, in: "heap profile: 1: 2 [3: 4] @ heap/x\n"},
		{name: "heap bad record", heap: true, in: "heap profile: 1: 2 [3: 4] @ heap/1048576\nx: 2 [3: 4] @ 0x1\n"},
		{name: "heap no records", heap: true, in: "heap profile: 0: 0 [0: 0] @ heap/1048576\n\n# runtime.MemStats\n"},
		{name: "frame without function", in: "1 @ 0x1\n#\t0x1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.heap {
				_, _, err = ParseHeapProfile([]byte(tc.in))
			} else {
				_, _, err = ParseGoroutineProfile([]byte(tc.in))
			}
			if err == nil {
				t.Error("no error")
			}
		})
	}
}

func TestParseHeapProfileZeroBytes(t *testing.T) {
	// Objects of size 0 (zero-length allocations) must not scale to NaN.
	top, total, err := ParseHeapProfile([]byte("heap profile: 1: 0 [1: 0] @ heap/1048576\n3: 0 [3: 0] @ 0x1\n#\t0x1\tmain.f+0x1\t/a.go:1\n"))
	if err != nil || total != 0 || len(top) != 1 || top[0].Count != 3 || top[0].Bytes != 0 {
		t.Fatalf("got %+v, %v, %v", top, total, err)
	}
}

func TestWhere(t *testing.T) {
	for _, tc := range []struct {
		frames []string
		want   string
	}{
		{[]string{"runtime.gopark", "gvisor.dev/gvisor/pkg/tcpip/adapters/gonet.commonRead", Module + "node/tunnel.(*splice).copyAdaptive", Module + "node/tunnel.Splice"}, "node/tunnel.(*splice).copyAdaptive"},
		{[]string{"runtime.mallocgc", "internal/poll.(*FD).Read", "k8s.io/api/core/v1.(*Pod).Unmarshal"}, "k8s.io/api/core/v1.(*Pod).Unmarshal"},
		{[]string{"runtime.gopark", "runtime.bgsweep"}, "runtime.gopark"},
		{nil, "?"},
	} {
		if got := where(tc.frames); got != tc.want {
			t.Errorf("where(%s) = %q, want %q", strings.Join(tc.frames, ","), got, tc.want)
		}
	}
}

func FuzzParseProfiles(f *testing.F) {
	for _, p := range []string{"testdata/goroutine-agent-debug1.txt", "testdata/heap-agent-debug1.txt"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, parse := range []func([]byte) ([]ProfileEntry, float64, error){ParseGoroutineProfile, ParseHeapProfile} {
			top, total, err := parse(b)
			if err != nil {
				continue
			}
			if math.IsNaN(total) || total < 0 {
				t.Errorf("total %v", total)
			}
			for _, e := range top {
				if e.Count < 0 || e.Bytes < 0 {
					t.Errorf("negative entry %+v", e)
				}
			}
		}
	})
}
