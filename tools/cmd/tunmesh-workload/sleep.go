package main

import "context"

// runSleep blocks for the configured duration (or forever) or until ctx is
// done. Either way it exits 0.
func runSleep(ctx context.Context, cfg sleepConfig, e *env) int {
	if cfg.forever {
		e.log.Info("sleeping until signalled")
		<-ctx.Done()
		e.log.Info("woken by signal")
		return exitOK
	}
	e.log.Info("sleeping", "duration", cfg.duration)
	if sleepCtx(ctx, cfg.duration) {
		e.log.Info("done sleeping")
	} else {
		e.log.Info("woken by signal")
	}
	return exitOK
}
