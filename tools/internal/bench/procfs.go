package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ClockTicks is USER_HZ, the unit of utime/stime in /proc/<pid>/stat: 100
// on every Linux architecture Go supports (the kernel fixes it for ABI
// compatibility; sysconf(_SC_CLK_TCK) would need cgo).
const ClockTicks = 100

// ParseProcStatCPU returns the user+system CPU time of a process from the
// content of /proc/<pid>/stat. The command name (field 2) may hold spaces
// and parentheses, so fields are counted from the last ')'.
func ParseProcStatCPU(stat []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("proc stat: no command name")
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("proc stat: %d fields after the command name, want >= 13", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("proc stat: utime %q stime %q not numbers", f[11], f[12])
	}
	return time.Duration(ut+st) * time.Second / ClockTicks, nil
}

// ParseVmRSS returns the resident set size in bytes from the content of
// /proc/<pid>/status.
func ParseVmRSS(status []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("proc status: VmRSS line %q", sc.Text())
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("proc status: VmRSS %q: %w", f[0], err)
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("proc status: no VmRSS line (kernel thread or zombie?)")
}

// PromValue returns the value of an unlabelled sample called name in a
// Prometheus text exposition; ok is false when it is not there.
func PromValue(text []byte, name string) (v float64, ok bool) {
	sc := bufio.NewScanner(bytes.NewReader(text))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != name {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			return 0, false
		}
		return v, true
	}
	return 0, false
}

// Smaps is a process's resident memory by kind, from
// /proc/<pid>/smaps_rollup, in bytes.
type Smaps struct {
	RSS  int64 // Rss: every resident page mapped
	Anon int64 // Anonymous: heap, stacks, runtime metadata, bss touched
	// File is Rss - Anonymous: resident pages of mapped files (the binary's
	// text and read-only data, libc) and shared memory. They are clean and
	// can be dropped and re-read, but VmRSS counts them.
	File int64
	// PSSFile is Pss_File plus Pss_Shmem: the file pages with each page
	// divided among the processes mapping it (two agents running one
	// binary file share its pages).
	PSSFile int64
}

// ParseSmapsRollup reads the content of /proc/<pid>/smaps_rollup. Rss and
// Anonymous are required; Pss_File and Pss_Shmem are summed when present
// (kernels before 5.10 lack them: PSSFile is then -1).
func ParseSmapsRollup(b []byte) (Smaps, error) {
	var (
		s                 Smaps
		haveRSS, haveAnon bool
		havePSS           bool
	)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			continue // the header line: "00400000-7ffc... ---p ... [rollup]"
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return Smaps{}, fmt.Errorf("smaps_rollup: %s %q: %w", key, f[0], err)
		}
		switch key {
		case "Rss":
			s.RSS, haveRSS = kb<<10, true
		case "Anonymous":
			s.Anon, haveAnon = kb<<10, true
		case "Pss_File", "Pss_Shmem":
			s.PSSFile += kb << 10
			havePSS = true
		}
	}
	if err := sc.Err(); err != nil {
		return Smaps{}, fmt.Errorf("smaps_rollup: %w", err)
	}
	if !haveRSS || !haveAnon {
		return Smaps{}, fmt.Errorf("smaps_rollup: no Rss or Anonymous line")
	}
	if !havePSS {
		s.PSSFile = -1
	}
	s.File = s.RSS - s.Anon
	return s, nil
}
