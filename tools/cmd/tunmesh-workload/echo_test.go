package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestEchoDial(t *testing.T) {
	t.Parallel()
	addr := startServer(t, "echo", "--listen", "127.0.0.1:0")

	t.Run("default ping", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", addr)
		if r.code != exitOK || r.stdout != "ping\n" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
		if !strings.Contains(r.stderr, `msg="reply matched"`) {
			t.Errorf("stderr lacks success log:\n%s", r.stderr)
		}
	})
	t.Run("custom text", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", "--send", "hello world", addr, "--timeout", "2s")
		if r.code != exitOK || r.stdout != "hello world" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("empty send", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", addr, "--send", "")
		if r.code != exitOK || r.stdout != "" {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("expect matches", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", addr, "--send", "abc", "--expect", "abc")
		if r.code != exitOK {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("expect mismatch", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", addr, "--expect", "pong\n")
		if r.code != exitFail {
			t.Errorf("code %d, want %d", r.code, exitFail)
		}
		if r.stdout != "ping\n" {
			t.Errorf("stdout %q, want the reply", r.stdout)
		}
		if !strings.Contains(r.stderr, `msg="reply mismatch"`) || !strings.Contains(r.stderr, `want="pong\n"`) {
			t.Errorf("stderr lacks a clear mismatch message:\n%s", r.stderr)
		}
	})
	t.Run("large payload with half-close", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(testWait))
		payload := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB
		// Write concurrently: the echo fills the socket buffers long
		// before we would start reading.
		werr := make(chan error, 1)
		go func() {
			_, err := conn.Write(payload)
			if err == nil {
				err = conn.(*net.TCPConn).CloseWrite()
			}
			werr <- err
		}()
		got, err := io.ReadAll(conn)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if err := <-werr; err != nil {
			t.Fatalf("write: %v", err)
		}
		if !bytes.Equal(got, payload) {
			t.Errorf("echoed %d bytes, want %d identical bytes", len(got), len(payload))
		}
	})
	t.Run("shutdown closes idle connections", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		logs := newLogWatch()
		done := make(chan int, 1)
		go func() { done <- run(ctx, []string{"echo", "--listen", "127.0.0.1:0"}, io.Discard, logs) }()
		var a string
		select {
		case a = <-logs.addr:
		case <-time.After(testWait):
			t.Fatal("echo not listening")
		}
		conn, err := net.Dial("tcp", a)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// Make sure the server has accepted the connection.
		if _, err := conn.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1)
		conn.SetReadDeadline(time.Now().Add(testWait))
		if _, err := io.ReadFull(conn, buf); err != nil {
			t.Fatal(err)
		}
		cancel()
		select {
		case code := <-done:
			if code != exitOK {
				t.Errorf("exit code %d, want 0", code)
			}
		case <-time.After(testWait):
			t.Fatal("echo did not stop with an open connection")
		}
		if _, err := conn.Read(buf); err == nil {
			t.Error("connection still open after shutdown")
		}
	})
}

func TestDialFailures(t *testing.T) {
	t.Parallel()
	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "dial", freeClosedPort(t))
		if r.code != exitFail || !strings.Contains(r.stderr, `msg="dial failed"`) {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		t.Parallel()
		// A server that accepts but never answers or closes.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
			}
		}()
		start := time.Now()
		r := runMode(t, "dial", ln.Addr().String(), "--timeout", "200ms")
		if r.code != exitFail || !strings.Contains(r.stderr, "timed out after 200ms") {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("dial took %v despite --timeout 200ms", d)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
			}
		}()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(100*time.Millisecond, cancel)
		r := runModeCtx(t, ctx, "dial", ln.Addr().String())
		if r.code != exitFail || !strings.Contains(r.stderr, "interrupted") {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
}
