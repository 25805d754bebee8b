package main

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// runExit prints the message, waits and returns the configured exit code.
// A cancelled ctx ends the wait early but does not change the code, so
// restart-policy tests see the same code however the process ends.
func runExit(ctx context.Context, cfg exitConfig, e *env) int {
	if cfg.message != "" {
		fmt.Fprint(e.stdout, withNewline(cfg.message))
	}
	if cfg.after > 0 {
		e.log.Info("waiting before exit", "after", cfg.after, "code", cfg.code)
		if !sleepCtx(ctx, cfg.after) {
			e.log.Info("wait interrupted by signal")
		}
	}
	e.log.Info("exiting", "code", cfg.code)
	return cfg.code
}

// sleepCtx waits for d or until ctx is done. It reports whether the full
// duration elapsed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func withNewline(s string) string {
	if strings.HasSuffix(s, "\n") {
		return s
	}
	return s + "\n"
}
