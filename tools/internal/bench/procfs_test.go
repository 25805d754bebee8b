package bench

import (
	"os"
	"testing"
	"time"
)

func TestParseProcStatCPU(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want time.Duration
		bad  bool
	}{
		{name: "plain", in: "20548 (cat) R 20543 20543 18460 0 -1 4194304 100 0 0 0 250 130 0 0 20 0 1 0 1074941 3133440 382", want: 3800 * time.Millisecond},
		{name: "spaces and parens in comm", in: "7 (tunmesh (x) y) S 1 7 7 0 -1 4194560 5 0 0 0 1 2 0 0 20 0 9 0 100 1 1", want: 30 * time.Millisecond},
		{name: "truncated", in: "7 (x) S 1 2 3", bad: true},
		{name: "no comm", in: "7 x S 1", bad: true},
		{name: "not numbers", in: "7 (x) S 1 7 7 0 -1 4194560 5 0 0 0 a b 0 0", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseProcStatCPU([]byte(tc.in))
			if tc.bad {
				if err == nil {
					t.Fatalf("no error, got %v", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestParseVmRSS(t *testing.T) {
	got, err := ParseVmRSS([]byte("Name:\ttunmesh-node\nVmPeak:\t 1000 kB\nVmRSS:\t   34816 kB\nRssAnon:\t 1 kB\n"))
	if err != nil || got != 34816<<10 {
		t.Fatalf("got %d, %v", got, err)
	}
	for _, bad := range []string{"Name:\tkthreadd\n", "VmRSS:\t12 MB\n", "VmRSS:\tx kB\n"} {
		if _, err := ParseVmRSS([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestPromValue(t *testing.T) {
	text := []byte(`# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.3554432e+07
process_resident_memory_bytes_max 1
tunmesh_pods{node="node-1"} 3
`)
	if v, ok := PromValue(text, "process_resident_memory_bytes"); !ok || v != 33554432 {
		t.Errorf("got %v %v", v, ok)
	}
	if _, ok := PromValue(text, "tunmesh_pods"); ok {
		t.Error("labelled sample taken as unlabelled")
	}
	if _, ok := PromValue(text, "go_goroutines"); ok {
		t.Error("missing metric found")
	}
}

func TestParseSmapsRollup(t *testing.T) {
	// Captured from an agent at 100 pods and 1,000 idle connections.
	b, err := os.ReadFile("testdata/smaps_rollup-agent.txt")
	if err != nil {
		t.Fatal(err)
	}
	s, err := ParseSmapsRollup(b)
	if err != nil {
		t.Fatal(err)
	}
	want := Smaps{RSS: 79524 << 10, Anon: 48036 << 10, File: (79524 - 48036) << 10, PSSFile: 15090 << 10}
	if s != want {
		t.Errorf("got %+v, want %+v", s, want)
	}
	for _, tc := range []struct {
		name, in string
		want     Smaps
		bad      bool
	}{
		{name: "old kernel without Pss_File", in: "Rss: 100 kB\nPss: 80 kB\nAnonymous: 40 kB\n", want: Smaps{RSS: 100 << 10, Anon: 40 << 10, File: 60 << 10, PSSFile: -1}},
		{name: "shmem counts as file", in: "Rss: 100 kB\nPss_File: 10 kB\nPss_Shmem: 5 kB\nAnonymous: 40 kB\n", want: Smaps{RSS: 100 << 10, Anon: 40 << 10, File: 60 << 10, PSSFile: 15 << 10}},
		{name: "no Anonymous", in: "Rss: 100 kB\n", bad: true},
		{name: "empty", in: "", bad: true},
		{name: "not a number", in: "Rss: x kB\nAnonymous: 1 kB\n", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseSmapsRollup([]byte(tc.in))
			if tc.bad {
				if err == nil {
					t.Fatalf("no error, got %+v", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func FuzzParseSmapsRollup(f *testing.F) {
	b, err := os.ReadFile("testdata/smaps_rollup-agent.txt")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSmapsRollup(b)
		if err == nil && s.File != s.RSS-s.Anon {
			t.Errorf("File %d != RSS %d - Anon %d", s.File, s.RSS, s.Anon)
		}
	})
}
