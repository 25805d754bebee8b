package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"time"
)

// Shared TCP plumbing for the echo, sink, dial and source modes.

// listen opens a TCP listener on addr and logs the bound address. Tests
// rely on the "listening" record's addr attribute to find ephemeral ports.
func listen(ctx context.Context, e *env, addr string) (net.Listener, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	e.log.Info("listening", "addr", ln.Addr().String())
	return ln, nil
}

// serveTCP accepts connections on ln until ctx is done, running handle for
// each in its own goroutine and closing the connection when handle returns.
// On shutdown it closes the listener and every open connection and waits for
// all handlers. It returns nil after a shutdown caused by ctx, and the error
// if accepting fails for good.
func serveTCP(ctx context.Context, log *slog.Logger, ln net.Listener, handle func(context.Context, net.Conn)) error {
	var (
		mu     sync.Mutex
		closed bool
		conns  = make(map[net.Conn]struct{})
		wg     sync.WaitGroup
	)
	shutdown := func() {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			return
		}
		closed = true
		ln.Close()
		for c := range conns {
			c.Close()
		}
	}
	stop := context.AfterFunc(ctx, shutdown)
	defer stop()

	var err error
	var backoff time.Duration
	for {
		var conn net.Conn
		conn, err = ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				break
			}
			// Probably transient (e.g. out of file descriptors): retry.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Warn("accept failed; retrying", "error", err, "retry_in", backoff)
			if !sleepCtx(ctx, backoff) {
				break
			}
			continue
		}
		backoff = 0
		mu.Lock()
		if closed {
			mu.Unlock()
			conn.Close()
			continue
		}
		conns[conn] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			defer func() {
				mu.Lock()
				delete(conns, conn)
				mu.Unlock()
				conn.Close()
			}()
			handle(ctx, conn)
		})
	}
	shutdown()
	wg.Wait()
	if ctx.Err() != nil {
		return nil // shutdown requested
	}
	return err
}

// serverExit logs how a server ended and returns the exit code for it.
func serverExit(log *slog.Logger, err error) int {
	if err != nil {
		log.Error("server failed", "error", err)
		return exitFail
	}
	log.Info("shut down")
	return exitOK
}

// closeWrite half-closes conn (sends FIN) if it supports that.
func closeWrite(conn net.Conn) error {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// abortOnDone makes blocked I/O on conn fail as soon as ctx is done. Call
// the returned function to stop watching ctx.
func abortOnDone(ctx context.Context, conn net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
}

// copyCounting copies r to w with a plain read/write loop and returns the
// number of bytes written. Unlike io.Copy it never hands the work to
// ReadFrom/WriteTo fast paths, so w may be the same connection as r.
// A nil w discards the data.
func copyCounting(w io.Writer, r io.Reader) (int64, error) {
	buf := make([]byte, 64<<10)
	var n int64
	for {
		nr, rerr := r.Read(buf)
		if nr > 0 {
			if w != nil {
				nw, werr := w.Write(buf[:nr])
				n += int64(nw)
				if werr != nil {
					return n, werr
				}
			} else {
				n += int64(nr)
			}
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

// summary is the JSON line written by sink (per connection) and source
// (total, with Conns set).
type summary struct {
	Bytes        int64   `json:"bytes"`
	Seconds      float64 `json:"seconds"`
	MBytesPerSec float64 `json:"mbytes_per_sec"` // MiB (2^20 bytes) per second
	Conns        int     `json:"conns,omitempty"`
}

func newSummary(bytes int64, elapsed time.Duration) summary {
	secs := elapsed.Seconds()
	var rate float64
	if secs > 0 {
		rate = float64(bytes) / (1 << 20) / secs
	}
	return summary{
		Bytes:        bytes,
		Seconds:      roundTo(secs, 6),
		MBytesPerSec: roundTo(rate, 3),
	}
}

func roundTo(x float64, decimals int) float64 {
	p := math.Pow10(decimals)
	return math.Round(x*p) / p
}
