package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/bench"
)

// profileThroughput samples the path's proxies (perf record -p, cpu-clock
// at 999 Hz, every thread) during one extra iperf3 run and returns the
// flat profile by binary and symbol: where the CPU of the throughput test
// goes.
func profileThroughput(ctx context.Context, c *cluster, p benchPath, cfg Config, dir string) ([]bench.PerfEntry, error) {
	pids, err := p.procs()
	if err != nil {
		return nil, err
	}
	ps := make([]string, len(pids))
	for i, pid := range pids {
		ps[i] = strconv.Itoa(pid)
	}
	data := filepath.Join(dir, "perf-"+p.name+".data")
	var stderr bytes.Buffer
	rec := exec.Command("perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", strings.Join(ps, ","), "-o", data)
	rec.Stderr = &stderr
	if err := rec.Start(); err != nil {
		return nil, fmt.Errorf("start perf record: %w", err)
	}
	// perf record owns the process until it is stopped and waited for
	// here, also when iperf3 fails.
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		_ = rec.Process.Signal(syscall.SIGINT)
		done := make(chan error, 1)
		go func() { done <- rec.Wait() }()
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			_ = rec.Process.Kill()
			return fmt.Errorf("perf record did not stop: %w", <-done)
		}
	}
	defer stop()
	time.Sleep(500 * time.Millisecond) // perf attaches to every thread first
	if _, err := iperfRun(ctx, c, p, cfg, cfg.Duration); err != nil {
		return nil, err
	}
	if err := stop(); err != nil {
		if _, serr := os.Stat(data); serr != nil {
			return nil, fmt.Errorf("perf record: %w: %s", err, lastLine(stderr.String()))
		}
	}
	out, err := exec.CommandContext(ctx, "perf", "report", "-i", data, "--stdio", "--no-children",
		"--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.5").Output()
	if err != nil {
		return nil, fmt.Errorf("perf report: %w", err)
	}
	return bench.ParsePerfReport(out)
}
