package main

import (
	"context"
	"testing"
	"time"
)

func TestExit(t *testing.T) {
	t.Parallel()
	t.Run("code and message", func(t *testing.T) {
		t.Parallel()
		r := runMode(t, "exit", "--code", "3", "--message", "bye")
		if r.code != 3 || r.stdout != "bye\n" {
			t.Errorf("code %d stdout %q", r.code, r.stdout)
		}
	})
	t.Run("default", func(t *testing.T) {
		t.Parallel()
		if r := runMode(t, "exit"); r.code != 0 || r.stdout != "" {
			t.Errorf("code %d stdout %q", r.code, r.stdout)
		}
	})
	t.Run("after", func(t *testing.T) {
		t.Parallel()
		start := time.Now()
		r := runMode(t, "exit", "--after", "50ms", "--code", "7")
		if r.code != 7 {
			t.Errorf("code %d, want 7", r.code)
		}
		if d := time.Since(start); d < 50*time.Millisecond {
			t.Errorf("exited after %v, want >= 50ms", d)
		}
	})
	t.Run("signal keeps code", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(50*time.Millisecond, cancel)
		r := runModeCtx(t, ctx, "exit", "--after", "1h", "--code", "4")
		if r.code != 4 {
			t.Errorf("code %d, want 4", r.code)
		}
	})
}

func TestSleep(t *testing.T) {
	t.Parallel()
	t.Run("duration", func(t *testing.T) {
		t.Parallel()
		start := time.Now()
		if r := runMode(t, "sleep", "30ms"); r.code != exitOK {
			t.Errorf("code %d", r.code)
		}
		if d := time.Since(start); d < 30*time.Millisecond {
			t.Errorf("slept %v, want >= 30ms", d)
		}
	})
	for _, args := range [][]string{{"sleep"}, {"sleep", "infinity"}, {"sleep", "3600"}} {
		t.Run("cancelled "+args[len(args)-1], func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			time.AfterFunc(50*time.Millisecond, cancel)
			if r := runModeCtx(t, ctx, args...); r.code != exitOK {
				t.Errorf("code %d, want 0", r.code)
			}
		})
	}
}
