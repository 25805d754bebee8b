package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// HTTPLoad is one run of the hey HTTP load generator.
type HTTPLoad struct {
	Total    time.Duration // wall time of the run
	PerSec   float64       // requests per second, as hey counts them
	P50, P99 time.Duration // request latency (hey prints 0.1 ms steps)
	OK       int           // 2xx responses
	Statuses map[int]int   // responses by status code
	Errors   int           // requests that got no response
}

var (
	heyTotal  = regexp.MustCompile(`^\s*Total:\s+([0-9.]+) secs`)
	heyPerSec = regexp.MustCompile(`^\s*Requests/sec:\s+([0-9.]+)`)
	heyPct    = regexp.MustCompile(`^\s*(\d+)% in ([0-9.]+) secs`)
	heyCount  = regexp.MustCompile(`^\s*\[(\d+)\]\s+(\d+) responses`) // [code] count responses
	heyError  = regexp.MustCompile(`^\s*\[(\d+)\]\s`)                 // [count] message
)

// ParseHey reads the text summary of hey. A run with no successful
// response is an error (hey exits 0 when every request failed).
func ParseHey(out []byte) (HTTPLoad, error) {
	l := HTTPLoad{Statuses: map[int]int{}}
	section := ""
	var have50, have99 bool
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if strings.HasSuffix(trimmed, ":") && !strings.HasPrefix(line, " ") {
			section = trimmed
			continue
		}
		switch section {
		case "Summary:":
			if m := heyTotal.FindStringSubmatch(line); m != nil {
				s, _ := strconv.ParseFloat(m[1], 64)
				l.Total = time.Duration(s * float64(time.Second))
			} else if m := heyPerSec.FindStringSubmatch(line); m != nil {
				l.PerSec, _ = strconv.ParseFloat(m[1], 64)
			}
		case "Latency distribution:":
			if m := heyPct.FindStringSubmatch(line); m != nil {
				s, _ := strconv.ParseFloat(m[2], 64)
				d := time.Duration(s * float64(time.Second))
				switch m[1] {
				case "50":
					l.P50, have50 = d, true
				case "99":
					l.P99, have99 = d, true
				}
			}
		case "Status code distribution:":
			if m := heyCount.FindStringSubmatch(line); m != nil {
				code, _ := strconv.Atoi(m[1])
				n, _ := strconv.Atoi(m[2])
				l.Statuses[code] += n
				if code >= 200 && code < 300 {
					l.OK += n
				}
			}
		case "Error distribution:":
			if m := heyError.FindStringSubmatch(line); m != nil {
				n, _ := strconv.Atoi(m[1])
				l.Errors += n
			}
		}
	}
	if l.OK == 0 {
		return HTTPLoad{}, fmt.Errorf("hey: no successful response (%d errors): %w", l.Errors, ErrToolFailed)
	}
	if !have50 || !have99 || l.Total <= 0 {
		return HTTPLoad{}, fmt.Errorf("hey output has no total or latency distribution: %w", ErrToolFailed)
	}
	return l, nil
}

// ConnsPerSec is successful requests per second of wall time; with
// -disable-keepalive every request is a new connection.
func (l HTTPLoad) ConnsPerSec() float64 {
	if l.Total <= 0 {
		return 0
	}
	return float64(l.OK) / l.Total.Seconds()
}
