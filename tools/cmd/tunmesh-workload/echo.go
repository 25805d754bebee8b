package main

import (
	"context"
	"net"
	"time"
)

// runEcho serves TCP echo on cfg.listen until ctx is done.
func runEcho(ctx context.Context, cfg echoConfig, e *env) int {
	ln, err := listen(ctx, e, cfg.listen)
	if err != nil {
		e.log.Error("cannot start", "error", err)
		return exitFail
	}
	return serverExit(e.log, serveTCP(ctx, e.log, ln, func(ctx context.Context, conn net.Conn) {
		echoConn(ctx, e, conn)
	}))
}

// echoConn writes everything read from conn back to it. When the client
// half-closes, the remaining bytes are echoed and then our side is
// half-closed too, so the client reads the full echo followed by EOF.
func echoConn(ctx context.Context, e *env, conn net.Conn) {
	start := time.Now()
	log := e.log.With("remote_addr", conn.RemoteAddr().String())
	n, err := copyCounting(conn, conn)
	if err == nil {
		err = closeWrite(conn)
	}
	switch {
	case err != nil && ctx.Err() != nil:
		log.Info("connection closed by shutdown", "bytes", n)
	case err != nil:
		log.Warn("connection failed", "bytes", n, "error", err)
	default:
		log.Info("connection done", "bytes", n, "duration", time.Since(start))
	}
}
