package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
)

// maxDialReply bounds how much of a reply dial keeps in memory.
const maxDialReply = 64 << 20

// runDial sends cfg.send over a fresh TCP connection, half-closes, prints
// the whole reply and checks it against the expected text.
func runDial(ctx context.Context, cfg dialConfig, e *env) int {
	log := e.log.With("addr", cfg.addr)
	reply, err := dialExchange(ctx, cfg)
	if len(reply) > 0 {
		e.stdout.Write(reply)
	}
	if err != nil {
		log.Error("dial failed", "error", err)
		return exitFail
	}
	want := cfg.send
	if cfg.hasExpect {
		want = cfg.expect
	}
	if string(reply) != want {
		log.Error("reply mismatch", "got", string(reply), "want", want)
		return exitFail
	}
	log.Info("reply matched", "bytes", len(reply))
	return exitOK
}

// dialExchange performs the connect/send/half-close/read-to-EOF exchange
// within cfg.timeout. It returns whatever reply it read, also on error.
func dialExchange(ctx context.Context, cfg dialConfig) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	reply, err := func() ([]byte, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", cfg.addr)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		defer abortOnDone(ctx, conn)()
		if _, err := io.WriteString(conn, cfg.send); err != nil {
			return nil, fmt.Errorf("send: %w", err)
		}
		if err := closeWrite(conn); err != nil {
			return nil, fmt.Errorf("half-close: %w", err)
		}
		reply, err := io.ReadAll(io.LimitReader(conn, maxDialReply+1))
		if err != nil {
			return reply, fmt.Errorf("read reply: %w", err)
		}
		if len(reply) > maxDialReply {
			return reply[:maxDialReply], fmt.Errorf("reply longer than %d bytes", maxDialReply)
		}
		return reply, nil
	}()
	if err != nil {
		switch {
		case errors.Is(ctx.Err(), context.DeadlineExceeded):
			err = fmt.Errorf("timed out after %v: %w", cfg.timeout, err)
		case ctx.Err() != nil:
			err = fmt.Errorf("interrupted: %w", err)
		}
	}
	return reply, err
}
