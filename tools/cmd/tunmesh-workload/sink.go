package main

import (
	"context"
	"encoding/json"
	"net"
	"time"
)

// runSink serves the throughput sink on cfg.listen until ctx is done.
func runSink(ctx context.Context, cfg sinkConfig, e *env) int {
	ln, err := listen(ctx, e, cfg.listen)
	if err != nil {
		e.log.Error("cannot start", "error", err)
		return exitFail
	}
	return serverExit(e.log, serveTCP(ctx, e.log, ln, func(ctx context.Context, conn net.Conn) {
		sinkConn(ctx, e, conn)
	}))
}

// sinkConn discards everything the client sends. Once the client
// half-closes, it writes one JSON summary line, half-closes and returns
// (serveTCP then closes the connection).
func sinkConn(ctx context.Context, e *env, conn net.Conn) {
	start := time.Now()
	log := e.log.With("remote_addr", conn.RemoteAddr().String())
	n, err := copyCounting(nil, conn)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("connection closed by shutdown", "bytes", n)
		} else {
			log.Warn("connection failed", "bytes", n, "error", err)
		}
		return
	}
	sum := newSummary(n, time.Since(start))
	line, _ := json.Marshal(sum) // cannot fail for this type
	line = append(line, '\n')
	if _, err := conn.Write(line); err != nil {
		log.Warn("writing summary failed", "bytes", n, "error", err)
		return
	}
	if err := closeWrite(conn); err != nil {
		log.Warn("half-close failed", "error", err)
	}
	log.Info("connection done", "bytes", n, "seconds", sum.Seconds, "mbytes_per_sec", sum.MBytesPerSec)
}
