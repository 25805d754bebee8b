package bench

import (
	"encoding/json"
	"errors"
	"fmt"
)

// ErrToolFailed means a tool ran but reported a failure in its output
// (several of them exit 0 on a refused connection).
var ErrToolFailed = errors.New("tool reported a failure")

// Throughput is one iperf3 run as the receiver saw it.
type Throughput struct {
	Bytes   int64   // bytes received
	Seconds float64 // receiver's interval
	Streams int     // parallel streams (-P)
}

// MBps is megabytes (10^6) per second.
func (t Throughput) MBps() float64 {
	if t.Seconds <= 0 {
		return 0
	}
	return float64(t.Bytes) / 1e6 / t.Seconds
}

// iperf3Report is the part of `iperf3 -c ... -J` output we read.
type iperf3Report struct {
	Error string `json:"error"`
	End   struct {
		Streams     []json.RawMessage `json:"streams"`
		SumReceived *struct {
			Seconds float64 `json:"seconds"`
			Bytes   int64   `json:"bytes"`
		} `json:"sum_received"`
	} `json:"end"`
}

// ParseIperf3 reads the JSON report of an iperf3 client (-J). It uses the
// receiver's sum, which is what crossed the path end to end (the sender's
// count includes bytes still in socket buffers when the timer fired).
func ParseIperf3(data []byte) (Throughput, error) {
	var r iperf3Report
	if err := json.Unmarshal(data, &r); err != nil {
		return Throughput{}, fmt.Errorf("parse iperf3 json: %w", err)
	}
	if r.Error != "" {
		return Throughput{}, fmt.Errorf("iperf3: %s: %w", r.Error, ErrToolFailed)
	}
	s := r.End.SumReceived
	if s == nil {
		return Throughput{}, fmt.Errorf("iperf3 json has no end.sum_received: %w", ErrToolFailed)
	}
	if s.Seconds <= 0 || s.Bytes <= 0 {
		return Throughput{}, fmt.Errorf("iperf3 received %d bytes in %.3f s: %w", s.Bytes, s.Seconds, ErrToolFailed)
	}
	return Throughput{Bytes: s.Bytes, Seconds: s.Seconds, Streams: len(r.End.Streams)}, nil
}
