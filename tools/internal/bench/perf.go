package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// PerfEntry is one line of a flat `perf report --sort dso,symbol`.
type PerfEntry struct {
	Percent float64
	DSO     string // binary or [kernel.kallsyms]
	Symbol  string
	Kernel  bool // [k], else [.] user space
}

var (
	perfLine = regexp.MustCompile(`^\s*([0-9.]+)%\s+(\S+)\s+\[([k.])\]\s+(.*)$`)
	// perf appends IPC columns ("-  -") when the event has no IPC data.
	perfIPC = regexp.MustCompile(`\s+-\s+-\s*$`)
)

// ParsePerfReport reads the --stdio output of `perf report --no-children
// --sort dso,symbol -g none`; comments and blank lines are skipped. An
// output without any sample line is an error (perf prints only headers
// when the filter matched nothing).
func ParsePerfReport(out []byte) ([]PerfEntry, error) {
	var es []PerfEntry
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		m := perfLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		p, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return nil, fmt.Errorf("perf report: bad percentage in %q", line)
		}
		sym := strings.TrimSpace(perfIPC.ReplaceAllString(m[4], ""))
		es = append(es, PerfEntry{Percent: p, DSO: m[2], Symbol: sym, Kernel: m[3] == "k"})
	}
	if len(es) == 0 {
		return nil, fmt.Errorf("perf report has no samples: %w", ErrToolFailed)
	}
	return es, nil
}

// KernelShare is the percentage of the entries' samples spent in the
// kernel.
func KernelShare(es []PerfEntry) float64 {
	var k, all float64
	for _, e := range es {
		all += e.Percent
		if e.Kernel {
			k += e.Percent
		}
	}
	if all == 0 {
		return 0
	}
	return 100 * k / all
}

// WriteProfile prints the top n entries as a Markdown table.
func WriteProfile(w io.Writer, title string, es []PerfEntry, n int) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (kernel share of the listed samples: %.0f%%):\n\n| %% of samples | where | symbol |\n|---|---|---|\n", title, KernelShare(es))
	for i, e := range es {
		if i == n {
			break
		}
		fmt.Fprintf(&b, "| %.1f | %s | `%s` |\n", e.Percent, e.DSO, strings.ReplaceAll(e.Symbol, "|", `\|`))
	}
	_, err := io.WriteString(w, b.String())
	return err
}
