package mux

// DrainersStarted is how many drainer goroutines streams have started.
func DrainersStarted() int64 { return drainersStarted.Load() }

// Queued is how many received bytes wait for the stream's reader or sink.
func (st *Stream) Queued() int {
	st.s.mu.Lock()
	defer st.s.mu.Unlock()
	return st.queued
}
