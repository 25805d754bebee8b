package bench

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func near(a, b, tol float64) bool { return math.Abs(a-b) <= tol }

// The testdata files are real outputs captured once from iperf3 3.12,
// sockperf 3.7 and hey 0.1.4 (Debian bookworm) over loopback.

func TestParseIperf3(t *testing.T) {
	for _, tc := range []struct {
		file    string
		bytes   int64
		seconds float64
		streams int
		mbps    float64
		wantErr error
	}{
		{file: "iperf3-P1.json", bytes: 5967708160, seconds: 2.000143, streams: 1, mbps: 2983.64},
		{file: "iperf3-P2.json", bytes: 8789688320, seconds: 2.001501, streams: 2, mbps: 4391.55},
		{file: "iperf3-refused.json", wantErr: ErrToolFailed},
	} {
		t.Run(tc.file, func(t *testing.T) {
			got, err := ParseIperf3(readTestdata(t, tc.file))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Bytes != tc.bytes || got.Seconds != tc.seconds || got.Streams != tc.streams {
				t.Errorf("got %+v", got)
			}
			if !near(got.MBps(), tc.mbps, 0.01) {
				t.Errorf("MBps = %.2f, want %.2f", got.MBps(), tc.mbps)
			}
		})
	}
}

func TestParseIperf3Malformed(t *testing.T) {
	for name, in := range map[string]string{
		"not json":        "iperf3: error - unable to connect",
		"no end sum":      `{"end":{}}`,
		"zero bytes":      `{"end":{"sum_received":{"seconds":1,"bytes":0}}}`,
		"negative secs":   `{"end":{"sum_received":{"seconds":-1,"bytes":10}}}`,
		"error with data": `{"error":"interrupt","end":{"sum_received":{"seconds":1,"bytes":10}}}`,
	} {
		if _, err := ParseIperf3([]byte(in)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseSockperf(t *testing.T) {
	for _, tc := range []struct {
		file      string
		roundTrip bool
		p50, p99  float64
		avg       float64
		max       float64
		obs       int
		wantErr   error
	}{
		{file: "sockperf-pp-fullrtt.txt", roundTrip: true, p50: 68.832, p99: 89.482, avg: 66.213, max: 3543.472, obs: 23409},
		{file: "sockperf-pp.txt", roundTrip: false, p50: 34.381, p99: 43.690, avg: 34.581, obs: 22410},
		{file: "sockperf-refused.txt", wantErr: ErrToolFailed},
	} {
		t.Run(tc.file, func(t *testing.T) {
			got, err := ParseSockperf(readTestdata(t, tc.file))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.RoundTrip != tc.roundTrip || got.P50 != tc.p50 || got.P99 != tc.p99 || got.Avg != tc.avg || got.Observations != tc.obs {
				t.Errorf("got %+v, want %+v", got, tc)
			}
			if tc.max != 0 && got.Max != tc.max {
				t.Errorf("max = %v, want %v", got.Max, tc.max)
			}
		})
	}
}

func TestParseSockperfWithoutPercentiles(t *testing.T) {
	in := "sockperf: == version #3.7 ==\nsockperf: Test end (interrupted by timer)\nsockperf: Total 0 observations\n"
	if _, err := ParseSockperf([]byte(in)); !errors.Is(err, ErrToolFailed) {
		t.Fatalf("err = %v, want ErrToolFailed", err)
	}
}

func TestParseHey(t *testing.T) {
	got, err := ParseHey(readTestdata(t, "hey.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if got.OK != 2000 || got.Errors != 0 || got.Statuses[200] != 2000 {
		t.Errorf("counts: %+v", got)
	}
	if got.Total != 188500*time.Microsecond || got.P50 != 600*time.Microsecond || got.P99 != 3800*time.Microsecond {
		t.Errorf("times: total %v p50 %v p99 %v", got.Total, got.P50, got.P99)
	}
	if !near(got.PerSec, 10610.8939, 1e-6) {
		t.Errorf("per sec %v", got.PerSec)
	}
	if !near(got.ConnsPerSec(), 2000/0.1885, 0.01) {
		t.Errorf("conns per sec %v", got.ConnsPerSec())
	}
}

func TestParseHeyAllFailed(t *testing.T) {
	_, err := ParseHey(readTestdata(t, "hey-refused.txt"))
	if !errors.Is(err, ErrToolFailed) {
		t.Fatalf("err = %v, want ErrToolFailed", err)
	}
}

// With few requests hey prints no 99th percentile; a run too short to
// have one is an error rather than a p99 of zero.
func TestParseHeyTooFewRequests(t *testing.T) {
	_, err := ParseHey(readTestdata(t, "hey-n32.txt"))
	if !errors.Is(err, ErrToolFailed) {
		t.Fatalf("err = %v, want ErrToolFailed", err)
	}
}

func TestParseHeyCountsErrorsAndStatuses(t *testing.T) {
	in := `
Summary:
  Total:	2.0000 secs
  Requests/sec:	100.0000

Latency distribution:
  50% in 0.0050 secs
  99% in 0.0200 secs

Status code distribution:
  [200]	190 responses
  [503]	5 responses

Error distribution:
  [3]	Get "http://10.0.0.1:8080/": dial tcp 10.0.0.1:8080: i/o timeout
  [2]	Get "http://10.0.0.1:8080/": read: connection reset by peer
`
	got, err := ParseHey([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if got.OK != 190 || got.Statuses[503] != 5 || got.Errors != 5 {
		t.Errorf("got %+v", got)
	}
	if got.ConnsPerSec() != 95 {
		t.Errorf("conns per sec = %v, want 95 (successes only)", got.ConnsPerSec())
	}
}

func FuzzParseIperf3(f *testing.F) {
	for _, n := range []string{"iperf3-P1.json", "iperf3-refused.json"} {
		f.Add(readTestdata(f, n))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := ParseIperf3(in)
		if err == nil && (got.Bytes <= 0 || got.Seconds <= 0) {
			t.Fatalf("accepted %+v", got)
		}
	})
}

func FuzzParseSockperf(f *testing.F) {
	for _, n := range []string{"sockperf-pp.txt", "sockperf-pp-fullrtt.txt", "sockperf-refused.txt"} {
		f.Add(readTestdata(f, n))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := ParseSockperf(in)
		if err == nil && got.Observations == 0 {
			t.Fatalf("accepted %+v", got)
		}
	})
}

func FuzzParseHey(f *testing.F) {
	for _, n := range []string{"hey.txt", "hey-refused.txt"} {
		f.Add(readTestdata(f, n))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := ParseHey(in)
		if err == nil && (got.OK == 0 || got.Total <= 0) {
			t.Fatalf("accepted %+v", got)
		}
	})
}

func TestParsePerfReport(t *testing.T) {
	es, err := ParsePerfReport(readTestdata(t, "perf-report.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if len(es) < 10 {
		t.Fatalf("%d entries", len(es))
	}
	first := PerfEntry{Percent: 22.53, DSO: "[kernel.kallsyms]", Symbol: "_raw_spin_unlock_irqrestore", Kernel: true}
	if es[0] != first {
		t.Errorf("first = %+v, want %+v", es[0], first)
	}
	var user *PerfEntry
	for i := range es {
		if !es[i].Kernel {
			user = &es[i]
			break
		}
	}
	if user == nil || user.DSO != "tunmesh-workload" || user.Symbol != "internal/runtime/syscall/linux.Syscall6" || user.Percent != 1.33 {
		t.Errorf("first user-space entry = %+v", user)
	}
	if s := KernelShare(es); s <= 50 || s >= 100 {
		t.Errorf("kernel share %v", s)
	}
	var b strings.Builder
	if err := WriteProfile(&b, "agents", es, 3); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "| 22.5 | [kernel.kallsyms] | `_raw_spin_unlock_irqrestore` |") || strings.Count(b.String(), "\n| ") != 4 {
		t.Errorf("profile table:\n%s", b.String())
	}
}

func TestParsePerfReportEmpty(t *testing.T) {
	in := "# Samples: 0 of event 'cpu-clock'\n#\n# Overhead  Shared Object  Symbol\n"
	if _, err := ParsePerfReport([]byte(in)); !errors.Is(err, ErrToolFailed) {
		t.Fatalf("err = %v", err)
	}
}

func FuzzParsePerfReport(f *testing.F) {
	f.Add(readTestdata(f, "perf-report.txt"))
	f.Fuzz(func(t *testing.T, in []byte) {
		es, err := ParsePerfReport(in)
		if err == nil && len(es) == 0 {
			t.Fatal("no entries and no error")
		}
	})
}
