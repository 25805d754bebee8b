package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestSinkSource(t *testing.T) {
	t.Parallel()
	addr := startServer(t, "sink", "--listen", "127.0.0.1:0")

	tests := []struct {
		name      string
		args      []string
		wantBytes int64 // 0: any positive amount
		wantConns int
	}{
		{"bytes", []string{"--bytes", "1000000"}, 1000000, 1},
		{"bytes two conns", []string{"--bytes", "1M", "--conns", "2"}, 1 << 20, 2},
		{"odd split", []string{"--bytes", "100001", "--conns", "3"}, 100001, 3},
		{"fewer bytes than conns", []string{"--bytes", "2", "--conns", "3"}, 2, 3},
		{"duration two conns", []string{"--duration", "200ms", "--conns", "2"}, 0, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := runMode(t, append([]string{"source", addr}, tt.args...)...)
			if r.code != exitOK {
				t.Fatalf("code %d; stderr:\n%s", r.code, r.stderr)
			}
			if strings.Count(r.stdout, "\n") != 1 {
				t.Errorf("stdout is not one line: %q", r.stdout)
			}
			var got summary
			if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
				t.Fatalf("stdout %q: %v", r.stdout, err)
			}
			if tt.wantBytes != 0 && got.Bytes != tt.wantBytes || got.Bytes <= 0 {
				t.Errorf("bytes = %d, want %d", got.Bytes, tt.wantBytes)
			}
			// Rates are rounded to 3 decimals, so tiny transfers show 0.
			if got.Conns != tt.wantConns || got.Seconds <= 0 || got.MBytesPerSec < 0 || got.Bytes >= 1<<20 && got.MBytesPerSec == 0 {
				t.Errorf("summary = %+v", got)
			}
			for _, key := range []string{`"bytes":`, `"seconds":`, `"mbytes_per_sec":`, `"conns":`} {
				if !strings.Contains(r.stdout, key) {
					t.Errorf("stdout lacks %s: %s", key, r.stdout)
				}
			}
			if tt.wantBytes == 0 && got.Seconds < 0.2 {
				t.Errorf("duration run took %vs, want >= 0.2s", got.Seconds)
			}
		})
	}

	t.Run("raw summary", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(testWait))
		if _, err := conn.Write([]byte("0123456789")); err != nil {
			t.Fatal(err)
		}
		conn.(*net.TCPConn).CloseWrite()
		out, err := io.ReadAll(conn)
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal(out, &got); err != nil || !strings.HasSuffix(string(out), "}\n") {
			t.Fatalf("summary %q: %v", out, err)
		}
		if got["bytes"] != 10.0 || len(got) != 3 {
			t.Errorf("summary = %s", out)
		}
	})
}

func TestSourceFailures(t *testing.T) {
	t.Parallel()
	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "source", freeClosedPort(t), "--bytes", "10", "--conns", "2")
		if r.code != exitFail || r.stdout != "" || strings.Count(r.stderr, `msg="connection failed"`) != 2 {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
	})
	t.Run("not a sink", func(t *testing.T) {
		t.Parallel()
		// An echo server answers with the data instead of a summary.
		addr := startServer(t, "echo", "--listen", "127.0.0.1:0")
		r := runMode(t, "source", addr, "--bytes", "5")
		if r.code != exitFail || !strings.Contains(r.stderr, "bad sink summary") {
			t.Errorf("code %d; stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		t.Parallel()
		addr := startServer(t, "sink", "--listen", "127.0.0.1:0")
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(100*time.Millisecond, cancel)
		start := time.Now()
		r := runModeCtx(t, ctx, "source", addr, "--duration", "1h", "--conns", "2")
		if r.code != exitFail || r.stdout != "" || !strings.Contains(r.stderr, "msg=interrupted") {
			t.Errorf("code %d stdout %q; stderr:\n%s", r.code, r.stdout, r.stderr)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("cancel took %v", d)
		}
	})
}
