package mux

// DrainersStarted is how many drainer goroutines streams have started.
func DrainersStarted() int64 { return drainersStarted.Load() }
