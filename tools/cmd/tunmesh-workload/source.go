package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

const sourceWriteSize = 64 << 10

// runSource streams zeros to a sink over cfg.conns parallel connections and
// prints the total as one JSON line. bytes is what the sinks confirmed;
// seconds is the wall-clock time from the first dial to the last summary.
func runSource(ctx context.Context, cfg sourceConfig, e *env) int {
	log := e.log.With("addr", cfg.addr)
	if cfg.bytes > 0 {
		log.Info("starting", "bytes", cfg.bytes, "conns", cfg.conns)
	} else {
		log.Info("starting", "duration", cfg.duration, "conns", cfg.conns)
	}

	start := time.Now()
	results := make([]int64, cfg.conns)
	errs := make([]error, cfg.conns)
	var wg sync.WaitGroup
	for i := range cfg.conns {
		quota := int64(0)
		if cfg.bytes > 0 {
			// Split the total evenly; the first bytes%conns connections
			// send one byte more.
			quota = cfg.bytes / int64(cfg.conns)
			if int64(i) < cfg.bytes%int64(cfg.conns) {
				quota++
			}
		}
		wg.Go(func() {
			results[i], errs[i] = sourceConn(ctx, cfg, quota)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	var total int64
	failed := false
	for i, err := range errs {
		if err != nil {
			failed = true
			log.Error("connection failed", "conn", i, "error", err)
			continue
		}
		total += results[i]
		log.Info("connection done", "conn", i, "bytes", results[i])
	}
	if failed {
		if ctx.Err() != nil {
			log.Error("interrupted")
		}
		return exitFail
	}
	sum := newSummary(total, elapsed)
	sum.Conns = cfg.conns
	line, _ := json.Marshal(sum) // cannot fail for this type
	fmt.Fprintf(e.stdout, "%s\n", line)
	log.Info("done", "bytes", sum.Bytes, "seconds", sum.Seconds, "mbytes_per_sec", sum.MBytesPerSec)
	return exitOK
}

// sourceConn runs one connection: streams quota bytes (or, when quota is 0,
// for cfg.duration), half-closes and reads the sink's summary. It returns
// the byte count the sink confirmed.
func sourceConn(ctx context.Context, cfg sourceConfig, quota int64) (int64, error) {
	dctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	var d net.Dialer
	conn, err := d.DialContext(dctx, "tcp", cfg.addr)
	cancel()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	// Any deadline set below is overridden by this once ctx is done; each
	// SetDeadline is followed by a ctx check to close the remaining gap.
	defer abortOnDone(ctx, conn)()

	var sent int64
	if cfg.bytes > 0 {
		sent, err = streamBytes(conn, quota)
	} else {
		sent, err = streamFor(ctx, conn, cfg.duration)
	}
	if err != nil {
		return 0, fmt.Errorf("sending after %d bytes: %w", sent, err)
	}
	if err := closeWrite(conn); err != nil {
		return 0, fmt.Errorf("half-close: %w", err)
	}
	conn.SetReadDeadline(time.Now().Add(cfg.timeout))
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	line, err := bufio.NewReader(io.LimitReader(conn, 4096)).ReadBytes('\n')
	if err == io.EOF && len(line) > 0 {
		err = nil // tolerate a missing final newline
	}
	if err != nil {
		return 0, fmt.Errorf("reading sink summary: %w", err)
	}
	var sum summary
	if err := json.Unmarshal(line, &sum); err != nil {
		return 0, fmt.Errorf("bad sink summary %q: %w", line, err)
	}
	if sum.Bytes != sent {
		return 0, fmt.Errorf("sink received %d bytes, but %d were sent", sum.Bytes, sent)
	}
	return sum.Bytes, nil
}

// streamBytes writes quota zero bytes to conn.
func streamBytes(conn net.Conn, quota int64) (int64, error) {
	buf := make([]byte, sourceWriteSize)
	var sent int64
	for sent < quota {
		n, err := conn.Write(buf[:min(quota-sent, int64(len(buf)))])
		sent += int64(n)
		if err != nil {
			return sent, err
		}
	}
	return sent, nil
}

// streamFor writes zeros to conn for duration d.
func streamFor(ctx context.Context, conn net.Conn, d time.Duration) (int64, error) {
	buf := make([]byte, sourceWriteSize)
	var sent int64
	conn.SetWriteDeadline(time.Now().Add(d))
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	for {
		n, err := conn.Write(buf)
		sent += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			break // d is over
		}
		if err != nil {
			return sent, err
		}
	}
	conn.SetWriteDeadline(time.Time{})
	if ctx.Err() != nil {
		return sent, ctx.Err()
	}
	return sent, nil
}
