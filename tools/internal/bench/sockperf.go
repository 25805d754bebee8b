package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Latency is one sockperf ping-pong run, in microseconds.
type Latency struct {
	// RoundTrip is true when sockperf measured the full round trip
	// (--full-rtt); otherwise its figures are half round trips.
	RoundTrip    bool
	Avg          float64
	P50, P99     float64
	Max          float64
	Observations int
}

var (
	ansiEscape     = regexp.MustCompile(`\x1b\[[0-9;]*m`)
	sockperfPct    = regexp.MustCompile(`percentile\s+([0-9.]+)\s*=\s*([0-9.]+)`)
	sockperfMax    = regexp.MustCompile(`<MAX> observation\s*=\s*([0-9.]+)`)
	sockperfAvg    = regexp.MustCompile(`avg-(rtt|latency)=([0-9.]+)`)
	sockperfTotal  = regexp.MustCompile(`Total (\d+) observations`)
	sockperfFailed = regexp.MustCompile(`(?i)sockperf: ERROR: (.*)`)
)

// ParseSockperf reads the text output of `sockperf ping-pong` (with or
// without --full-rtt). sockperf exits 0 even when it cannot connect, so a
// report without percentiles is an error.
func ParseSockperf(out []byte) (Latency, error) {
	var l Latency
	var have50, have99 bool
	sc := bufio.NewScanner(bytes.NewReader(ansiEscape.ReplaceAll(out, nil)))
	for sc.Scan() {
		line := sc.Text()
		if m := sockperfFailed.FindStringSubmatch(line); m != nil {
			return Latency{}, fmt.Errorf("sockperf: %s: %w", strings.TrimSpace(m[1]), ErrToolFailed)
		}
		if m := sockperfAvg.FindStringSubmatch(line); m != nil {
			l.RoundTrip = m[1] == "rtt"
			l.Avg, _ = strconv.ParseFloat(m[2], 64) // the regexp admits only numbers
			continue
		}
		if m := sockperfTotal.FindStringSubmatch(line); m != nil {
			l.Observations, _ = strconv.Atoi(m[1])
			continue
		}
		if m := sockperfMax.FindStringSubmatch(line); m != nil {
			l.Max, _ = strconv.ParseFloat(m[1], 64)
			continue
		}
		if m := sockperfPct.FindStringSubmatch(line); m != nil {
			p, err1 := strconv.ParseFloat(m[1], 64)
			v, err2 := strconv.ParseFloat(m[2], 64)
			if err1 != nil || err2 != nil {
				return Latency{}, fmt.Errorf("sockperf: bad percentile line %q", line)
			}
			switch p {
			case 50:
				l.P50, have50 = v, true
			case 99:
				l.P99, have99 = v, true
			}
		}
	}
	if !have50 || !have99 || l.Observations == 0 {
		return Latency{}, fmt.Errorf("sockperf output has no p50/p99 or no observations: %w", ErrToolFailed)
	}
	return l, nil
}
