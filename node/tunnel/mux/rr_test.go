package mux_test

import (
	"context"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
	"github.com/tunmesh/tunmesh/node/workers"
)

// BenchmarkRoundTrip is a 1 KiB ping-pong through both agents' splices
// over one stream (pods read on demand, as netstack connections are),
// with the blocking Splice or SpliceAsync, to compare the wake-up paths:
// go test -run '^$' -bench RoundTrip ./node/tunnel/mux/
func BenchmarkRoundTrip(b *testing.B) {
	spliceModes(b, func(b *testing.B, cancel context.CancelFunc, goHook func(func()), splice func(a, c net.Conn, done func())) {
		serverPod := make(chan *tunneltest.ReadyPod, 1)
		ended := make(chan struct{}, 2)
		c, s := tunneltest.TLSPair(b)
		client := mux.Client(c, mux.Config{Go: goHook})
		server := mux.Server(s, mux.Config{Go: goHook}, func(st *mux.Stream) {
			st.Accept()
			agentSide, pod := tunneltest.ReadyPipe()
			serverPod <- pod
			release := st.Hold()
			splice(st, agentSide, func() { release(); ended <- struct{}{} })
		})
		defer func() { client.Close(); server.Close(); client.Wait(); server.Wait() }()
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			b.Fatal(err)
		}
		agentSide, pod := tunneltest.ReadyPipe()
		splice(agentSide, st, func() { ended <- struct{}{} })
		msg := make([]byte, 1024)
		pod.Write(msg)
		sp := <-serverPod
		// The server pod echoes.
		go func() {
			buf := make([]byte, 1024)
			for {
				if _, err := io.ReadFull(sp, buf); err != nil {
					return
				}
				if _, err := sp.Write(buf); err != nil {
					return
				}
			}
		}()
		if _, err := io.ReadFull(pod, msg); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for range b.N {
			pod.Write(msg)
			if _, err := io.ReadFull(pod, msg); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		cancel()
		<-ended
		<-ended
		pod.Close()
		sp.Close()
	})
}

// BenchmarkConnection is one short connection per iteration through both
// agents' splices over a pooled session (pods read on demand): the client
// pod sends a request and ends its side, the server pod answers and ends
// its side. It compares the per-connection cost of the blocking Splice
// and SpliceAsync:
// go test -run '^$' -bench Connection ./node/tunnel/mux/
func BenchmarkConnection(b *testing.B) {
	spliceModes(b, func(b *testing.B, cancel context.CancelFunc, goHook func(func()), splice func(a, c net.Conn, done func())) {
		c, s := tunneltest.TLSPair(b)
		client := mux.Client(c, mux.Config{Go: goHook})
		server := mux.Server(s, mux.Config{Go: goHook}, func(st *mux.Stream) {
			st.Accept()
			agentSide, pod := tunneltest.ReadyPipe()
			release := st.Hold()
			splice(st, agentSide, release)
			// The server pod: read the request, answer, end.
			go func() {
				buf := make([]byte, 64)
				io.ReadFull(pod, buf)
				pod.Write(buf)
				pod.CloseWrite()
				io.Copy(io.Discard, pod)
			}()
		})
		defer func() { client.Close(); server.Close(); client.Wait(); server.Wait() }()
		req := make([]byte, 64)
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			start := time.Now()
			st, err := client.OpenStream(hdr, false)
			if err != nil {
				b.Fatal(err)
			}
			agentSide, pod := tunneltest.ReadyPipe()
			ended := make(chan struct{})
			splice(agentSide, st, func() { close(ended) })
			pod.Write(req)
			pod.CloseWrite()
			if _, err := io.ReadAll(pod); err != nil {
				b.Fatal(err)
			}
			<-ended
			lat = append(lat, time.Since(start))
		}
		b.StopTimer()
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
		b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-us")
	})
}

// spliceModes runs bench once with the blocking Splice ("splice"), once
// with SpliceAsync ("async") and once with SpliceAsync and the
// per-connection goroutines on a worker pool ("async-workers", as the
// agent runs them: goHook is the pool's Go, nil otherwise): splice(a, c,
// done) splices a and c and calls done at the end, either way; cancel
// ends every splice of the run.
func spliceModes(b *testing.B, bench func(b *testing.B, cancel context.CancelFunc, goHook func(func()), splice func(a, c net.Conn, done func()))) {
	for _, mode := range []string{"splice", "async", "async-workers"} {
		b.Run(mode, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var goHook func(func())
			if mode == "async-workers" {
				pool := workers.New(workers.Options{})
				defer pool.Close()
				goHook = pool.Go
			}
			bench(b, cancel, goHook, func(a, c net.Conn, done func()) {
				if mode != "splice" {
					tunnel.SpliceAsync(ctx, a, c, tunnel.SpliceOptions{Go: goHook}, func(tunnel.SpliceStats, error) { done() })
					return
				}
				go func() { tunnel.Splice(ctx, a, c, tunnel.SpliceOptions{}); done() }()
			})
		})
	}
}
