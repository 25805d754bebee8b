package tunnel_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// leakCheck fails the test if it leaves goroutines behind. Call it first, so
// that its cleanup runs after every other cleanup has closed connections.
func leakCheck(t *testing.T) {
	t.Helper()
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= base {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("%d goroutines left, %d before the test:\n%s", n, base, buf)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

type spliceResult struct {
	stats tunnel.SpliceStats
	err   error
}

// chain is an application client and server talking through one or more
// Splice calls, each started by newChain and waited for by wait.
type chain struct {
	client, server net.Conn
	// inner are the connections handed to Splice, in chain order.
	inner   []net.Conn
	results chan spliceResult
	splices int
}

// Kinds of chain:
//
//	tcp:  client =TCP= a |Splice| b =TCP= server
//	pipe: the same with tunneltest.Pipe instead of TCP
//	tls:  the mesh: client =TCP= a |Splice| TLS 1.3 |Splice| b =TCP= server,
//	      with the header exchange done on the TLS connection first
var kinds = []string{"tcp", "pipe", "tls"}

func newChain(t testing.TB, ctx context.Context, kind string, opts tunnel.SpliceOptions) *chain {
	t.Helper()
	ch := &chain{results: make(chan spliceResult, 2)}
	start := func(a, b net.Conn) {
		ch.splices++
		go func() {
			st, err := tunnel.Splice(ctx, a, b, opts)
			ch.results <- spliceResult{st, err}
		}()
	}
	switch kind {
	case "tcp":
		c, a := tunneltest.TCPPair(t)
		b, s := tunneltest.TCPPair(t)
		ch.client, ch.server, ch.inner = c, s, []net.Conn{a, b}
		start(a, b)
	case "pipe":
		c, a := tunneltest.Pipe()
		b, s := tunneltest.Pipe()
		t.Cleanup(func() {
			for _, c := range []net.Conn{c, a, b, s} {
				c.Close()
			}
		})
		ch.client, ch.server, ch.inner = c, s, []net.Conn{a, b}
		start(a, b)
	case "tls":
		c, a := tunneltest.TCPPair(t)
		tc, ts := tunneltest.TLSPair(t)
		b, s := tunneltest.TCPPair(t)
		// Client agent sends the header; server agent checks and answers.
		if err := tunnel.WriteHeader(tc, hdr4); err != nil {
			t.Fatalf("WriteHeader: %v", err)
		}
		if h, err := tunnel.ReadHeader(ts); err != nil || h != hdr4 {
			t.Fatalf("ReadHeader = %+v, %v", h, err)
		}
		if err := tunnel.WriteReply(ts, tunnel.ReasonNone); err != nil {
			t.Fatalf("WriteReply: %v", err)
		}
		if err := tunnel.ReadReply(tc); err != nil {
			t.Fatalf("ReadReply: %v", err)
		}
		ch.client, ch.server, ch.inner = c, s, []net.Conn{a, tc, ts, b}
		start(a, tc)
		start(ts, b)
	default:
		t.Fatalf("unknown chain kind %q", kind)
	}
	return ch
}

// wait returns the results of all splices of the chain.
func (ch *chain) wait(t testing.TB, max time.Duration) []spliceResult {
	t.Helper()
	var rs []spliceResult
	timeout := time.After(max)
	for range ch.splices {
		select {
		case r := <-ch.results:
			rs = append(rs, r)
		case <-timeout:
			t.Fatalf("Splice did not return within %v", max)
		}
	}
	return rs
}

func closeWrite(t testing.TB, c net.Conn) {
	t.Helper()
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Errorf("CloseWrite: %v", err)
	}
}

// send writes n pseudo-random bytes and returns their checksum.
func send(t testing.TB, c net.Conn, seed byte, n int64) [sha256.Size]byte {
	h := sha256.New()
	src := io.LimitReader(rand.NewChaCha8([32]byte{seed}), n)
	if _, err := io.CopyBuffer(io.MultiWriter(c, h), src, make([]byte, 32<<10)); err != nil {
		t.Errorf("send: %v", err)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// recv reads until EOF and returns the checksum and count.
func recv(t testing.TB, c net.Conn) ([sha256.Size]byte, int64) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, struct{ io.Reader }{c}, make([]byte, 32<<10))
	if err != nil {
		t.Errorf("recv: %v", err)
	}
	return [sha256.Size]byte(h.Sum(nil)), n
}

func TestSpliceTransfer(t *testing.T) {
	for _, kind := range kinds {
		for _, size := range []int64{1 << 20, 32 << 20} {
			t.Run(fmt.Sprintf("%s/%dMiB", kind, size>>20), func(t *testing.T) {
				leakCheck(t)
				ch := newChain(t, t.Context(), kind, tunnel.SpliceOptions{})
				up, down := size, size+12345 // different sizes catch mixed-up directions
				var (
					wg                       sync.WaitGroup
					sentUp, sentDown         [sha256.Size]byte
					gotUp, gotDown           [sha256.Size]byte
					gotUpCount, gotDownCount int64
				)
				wg.Go(func() { sentUp = send(t, ch.client, 1, up); closeWrite(t, ch.client) })
				wg.Go(func() { gotDown, gotDownCount = recv(t, ch.client) })
				wg.Go(func() { sentDown = send(t, ch.server, 2, down); closeWrite(t, ch.server) })
				wg.Go(func() { gotUp, gotUpCount = recv(t, ch.server) })
				wg.Wait()

				if gotUpCount != up || gotUp != sentUp {
					t.Errorf("client->server: got %d bytes (sum %x), sent %d (sum %x)", gotUpCount, gotUp[:4], up, sentUp[:4])
				}
				if gotDownCount != down || gotDown != sentDown {
					t.Errorf("server->client: got %d bytes (sum %x), sent %d (sum %x)", gotDownCount, gotDown[:4], down, sentDown[:4])
				}
				for _, r := range ch.wait(t, 10*time.Second) {
					if r.err != nil {
						t.Errorf("Splice: %v", r.err)
					}
					if r.stats != (tunnel.SpliceStats{AToB: up, BToA: down}) {
						t.Errorf("Splice stats %+v, want AToB %d BToA %d", r.stats, up, down)
					}
				}
				// Splice closes what it was given.
				for _, c := range ch.inner {
					if _, err := c.Write([]byte("x")); err == nil {
						t.Errorf("%T still open after Splice returned", c)
					}
				}
			})
		}
	}
}

// TestSpliceHalfClose is the request/response shape: one side sends and
// closes its write half, the other reads to EOF and only then answers.
// Without half-close the answer would have nowhere to go.
func TestSpliceHalfClose(t *testing.T) {
	for _, kind := range kinds {
		for _, first := range []string{"client", "server"} {
			t.Run(kind+"/"+first+"-closes-first", func(t *testing.T) {
				leakCheck(t)
				ch := newChain(t, t.Context(), kind, tunnel.SpliceOptions{})
				asker, answerer := ch.client, ch.server
				if first == "server" {
					asker, answerer = ch.server, ch.client
				}
				request := bytes.Repeat([]byte("request "), 20000)
				response := bytes.Repeat([]byte("response "), 30000)

				answered := make(chan error, 1)
				go func() {
					got, err := io.ReadAll(answerer) // ends only at EOF
					if err != nil || !bytes.Equal(got, request) {
						answered <- fmt.Errorf("answerer read %d bytes, %v; want the %d byte request", len(got), err, len(request))
						return
					}
					if _, err := answerer.Write(response); err != nil {
						answered <- fmt.Errorf("write response after EOF: %w", err)
						return
					}
					answered <- answerer.Close()
				}()

				if _, err := asker.Write(request); err != nil {
					t.Fatalf("write request: %v", err)
				}
				closeWrite(t, asker)
				got, err := io.ReadAll(asker)
				if err != nil || !bytes.Equal(got, response) {
					t.Errorf("asker read %d bytes, %v; want the %d byte response", len(got), err, len(response))
				}
				if err := <-answered; err != nil {
					t.Error(err)
				}
				up, down := int64(len(request)), int64(len(response))
				if first == "server" {
					up, down = down, up
				}
				for _, r := range ch.wait(t, 5*time.Second) {
					if r.err != nil {
						t.Errorf("Splice: %v", r.err)
					}
					if r.stats != (tunnel.SpliceStats{AToB: up, BToA: down}) {
						t.Errorf("Splice stats %+v, want AToB %d BToA %d", r.stats, up, down)
					}
				}
			})
		}
	}
}

// TestSpliceNoCloseWrite: a side that cannot half-close (net.Pipe) gets the
// EOF as a full close, and Splice ends without error.
func TestSpliceNoCloseWrite(t *testing.T) {
	leakCheck(t)
	c, a := net.Pipe()
	b, s := net.Pipe()
	defer c.Close()
	defer s.Close()
	res := make(chan spliceResult, 1)
	go func() {
		st, err := tunnel.Splice(t.Context(), a, b, tunnel.SpliceOptions{})
		res <- spliceResult{st, err}
	}()
	go func() {
		c.Write([]byte("hello"))
		c.Close()
	}()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hello" {
		t.Errorf("server read %q, %v; want hello", got, err)
	}
	select {
	case r := <-res:
		if r.err != nil || r.stats.AToB != 5 {
			t.Errorf("Splice = %+v, %v; want 5 bytes a->b and no error", r.stats, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Splice did not return")
	}
}

func TestSpliceIdleTimeout(t *testing.T) {
	const idle = 100 * time.Millisecond
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			leakCheck(t)
			start := time.Now()
			ch := newChain(t, t.Context(), kind, tunnel.SpliceOptions{IdleTimeout: idle})
			checkEnds(t, ch.wait(t, 5*time.Second), tunnel.ErrIdleTimeout)
			if d := time.Since(start); d < idle {
				t.Errorf("Splice returned after %v, before the idle timeout %v", d, idle)
			}
			// The applications learn of it, as an error where TCP allows.
			checkAborted(t, kind, ch.client)
			checkAborted(t, kind, ch.server)
		})
	}
}

// checkEnds checks that at least one splice of a chain ended with want and
// the others with want or a reset: in a mesh chain the hop that gives up
// first aborts its TLS connection, and the next hop may see that reset before
// its own timer or context fires.
func checkEnds(t *testing.T, rs []spliceResult, want error) {
	t.Helper()
	seen := false
	for _, r := range rs {
		switch {
		case errors.Is(r.err, want):
			seen = true
		case errors.Is(r.err, syscall.ECONNRESET):
		default:
			t.Errorf("Splice = %v, want %v", r.err, want)
		}
	}
	if !seen {
		t.Errorf("no splice ended with %v", want)
	}
}

// checkAborted checks that c's peer went away: with a reset on TCP, with an
// end of stream on a pipe.
func checkAborted(t *testing.T, kind string, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	switch {
	case kind == "pipe" && err == io.EOF:
	case kind != "pipe" && errors.Is(err, syscall.ECONNRESET):
	default:
		t.Errorf("read from %s application end: %v, want the connection aborted", kind, err)
	}
}

// TestSpliceIdleTimeoutTraffic: traffic in one direction alone keeps the
// splice alive; the timeout counts from the last byte. The margins are wide
// (a byte every tenth of the timeout) so a loaded machine does not flake.
func TestSpliceIdleTimeoutTraffic(t *testing.T) {
	const (
		idle  = 400 * time.Millisecond
		every = idle / 10
	)
	for _, kind := range []string{"tcp", "pipe"} {
		t.Run(kind, func(t *testing.T) {
			leakCheck(t)
			ch := newChain(t, t.Context(), kind, tunnel.SpliceOptions{IdleTimeout: idle})
			go io.Copy(io.Discard, ch.server) // ends when the splice aborts
			var lastWrite time.Time
			for range 30 { // three idle timeouts' worth
				if _, err := ch.client.Write([]byte("tick")); err != nil {
					t.Fatalf("write: %v", err)
				}
				lastWrite = time.Now()
				time.Sleep(every)
			}
			select {
			case r := <-ch.results:
				t.Fatalf("Splice ended during traffic: %v", r.err)
			default:
			}
			r := ch.wait(t, 5*time.Second)[0]
			if !errors.Is(r.err, tunnel.ErrIdleTimeout) || r.stats.AToB != 120 {
				t.Errorf("Splice = %+v, %v; want 120 bytes and ErrIdleTimeout", r.stats, r.err)
			}
			if d := time.Since(lastWrite); d < idle {
				t.Errorf("timed out %v after the last byte, want at least %v", d, idle)
			}
		})
	}
}

// TestSpliceCancel cancels while every hop is blocked writing to a peer that
// does not read: Splice must still return promptly.
func TestSpliceCancel(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			leakCheck(t)
			ctx, cancel := context.WithCancel(t.Context())
			ch := newChain(t, ctx, kind, tunnel.SpliceOptions{})
			writerDone := make(chan struct{})
			go func() {
				defer close(writerDone)
				buf := make([]byte, 64<<10)
				for {
					if _, err := ch.client.Write(buf); err != nil {
						return
					}
				}
			}()
			time.Sleep(200 * time.Millisecond) // let the buffers fill
			start := time.Now()
			cancel()
			checkEnds(t, ch.wait(t, 10*time.Second), context.Canceled)
			// Well below the 5s a *tls.Conn's Close may spend sending
			// close_notify to a peer that does not read.
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Splice took %v to return after cancel", d)
			}
			select {
			case <-writerDone:
			case <-time.After(5 * time.Second):
				t.Error("client still blocked writing after the splice was cancelled")
			}
		})
	}
}

func TestSpliceCancelledBeforeStart(t *testing.T) {
	leakCheck(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	c, a := tunneltest.TCPPair(t)
	b, s := tunneltest.TCPPair(t)
	if _, err := tunnel.Splice(ctx, a, b, tunnel.SpliceOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Splice = %v, want context.Canceled", err)
	}
	checkAborted(t, "tcp", c)
	checkAborted(t, "tcp", s)
}

// faultyConn fails reads (or writes) with an error once readOK (writeOK)
// bytes have passed. Read and Write run on different goroutines, so each
// direction has its own counter.
type faultyConn struct {
	net.Conn
	readErr, writeErr error
	readOK, writeOK   int
}

func (c *faultyConn) Read(p []byte) (int, error) {
	if c.readErr != nil && c.readOK <= 0 {
		return 0, c.readErr
	}
	n, err := c.Conn.Read(p)
	c.readOK -= n
	return n, err
}

func (c *faultyConn) Write(p []byte) (int, error) {
	if c.writeErr != nil && c.writeOK <= 0 {
		return 0, c.writeErr
	}
	n, err := c.Conn.Write(p)
	c.writeOK -= n
	return n, err
}

func TestSpliceSideError(t *testing.T) {
	errBoom := errors.New("boom")
	for _, tc := range []struct {
		name string
		wrap func(a, b net.Conn) (net.Conn, net.Conn)
	}{
		{"read a", func(a, b net.Conn) (net.Conn, net.Conn) { return &faultyConn{Conn: a, readErr: errBoom, readOK: 5}, b }},
		{"read b", func(a, b net.Conn) (net.Conn, net.Conn) { return a, &faultyConn{Conn: b, readErr: errBoom} }},
		{"write b", func(a, b net.Conn) (net.Conn, net.Conn) {
			return a, &faultyConn{Conn: b, writeErr: errBoom, writeOK: 5}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			c, a := tunneltest.TCPPair(t)
			b, s := tunneltest.TCPPair(t)
			fa, fb := tc.wrap(a, b)
			res := make(chan spliceResult, 1)
			go func() {
				st, err := tunnel.Splice(t.Context(), fa, fb, tunnel.SpliceOptions{})
				res <- spliceResult{st, err}
			}()
			c.Write([]byte("hello"))
			time.Sleep(20 * time.Millisecond)
			c.Write([]byte("world"))
			select {
			case r := <-res:
				if !errors.Is(r.err, errBoom) {
					t.Errorf("Splice = %v, want %v", r.err, errBoom)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Splice did not return")
			}
			// A faultyConn hides SetLinger, so its peer sees a FIN, the
			// other peer a reset; either way both applications see the end.
			checkEnded(t, c)
			checkEnded(t, s)
		})
	}
}

func checkEnded(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, err := c.Read(make([]byte, 64))
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return
		}
		if err != nil {
			t.Errorf("read: %v, want the connection ended", err)
			return
		}
	}
}

// TestSpliceResetPropagates: a reset from one application reaches the other
// as a reset, through every hop, not as a clean end of stream.
func TestSpliceResetPropagates(t *testing.T) {
	for _, kind := range []string{"tcp", "tls"} {
		t.Run(kind, func(t *testing.T) {
			leakCheck(t)
			ch := newChain(t, t.Context(), kind, tunnel.SpliceOptions{})
			ch.server.(*net.TCPConn).SetLinger(0)
			ch.server.Close()
			for _, r := range ch.wait(t, 5*time.Second) {
				if !errors.Is(r.err, syscall.ECONNRESET) {
					t.Errorf("Splice = %v, want ECONNRESET", r.err)
				}
			}
			checkAborted(t, kind, ch.client)
		})
	}
}

func TestSpliceBadArguments(t *testing.T) {
	leakCheck(t)
	a, b := tunneltest.Pipe()
	if _, err := tunnel.Splice(t.Context(), a, nil, tunnel.SpliceOptions{}); err == nil {
		t.Error("Splice with a nil conn succeeded")
	}
	if _, err := b.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("the non-nil conn was not closed: read = %v", err)
	}
	c, d := tunneltest.Pipe()
	if _, err := tunnel.Splice(t.Context(), c, d, tunnel.SpliceOptions{IdleTimeout: -1}); err == nil {
		t.Error("Splice with a negative idle timeout succeeded")
	}
}

// TestSpliceBufferSize runs a small odd buffer, outside the pool.
func TestSpliceBufferSize(t *testing.T) {
	leakCheck(t)
	c, a := tunneltest.TCPPair(t)
	b, s := tunneltest.TCPPair(t)
	res := make(chan spliceResult, 1)
	go func() {
		st, err := tunnel.Splice(t.Context(), a, b, tunnel.SpliceOptions{BufferSize: 1000})
		res <- spliceResult{st, err}
	}()
	sentc := make(chan [sha256.Size]byte, 1)
	go func() { sentc <- send(t, c, 3, 1<<20); c.CloseWrite() }()
	got, n := recv(t, s)
	s.CloseWrite()
	sent := <-sentc
	if n != 1<<20 || got != sent {
		t.Errorf("got %d bytes, want %d with the same checksum", n, 1<<20)
	}
	if r := <-res; r.err != nil || r.stats.AToB != 1<<20 {
		t.Errorf("Splice = %+v, %v", r.stats, r.err)
	}
}

// BenchmarkSplice measures throughput in one direction through Splice:
//
//	tcp: loopback TCP -> Splice -> loopback TCP
//	tls: loopback TCP -> Splice -> TLS 1.3 -> Splice -> loopback TCP (a mesh hop)
func BenchmarkSplice(b *testing.B) {
	for _, kind := range []string{"tcp", "tls"} {
		b.Run(kind, func(b *testing.B) {
			ch := newChain(b, b.Context(), kind, tunnel.SpliceOptions{})
			benchThroughput(b, ch.client, ch.server)
			ch.wait(b, 10*time.Second)
		})
	}
}

// BenchmarkLoopbackBaseline is the same transfer over one loopback TCP
// connection without Splice, for comparison.
func BenchmarkLoopbackBaseline(b *testing.B) {
	c, s := tunneltest.TCPPair(b)
	benchThroughput(b, c, s)
}

func benchThroughput(b *testing.B, src, dst net.Conn) {
	chunk := make([]byte, 256<<10)
	sunk := make(chan int64)
	go func() {
		buf := make([]byte, 256<<10)
		var n int64
		for {
			k, err := dst.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		dst.(interface{ CloseWrite() error }).CloseWrite()
		sunk <- n
	}()
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		if _, err := src.Write(chunk); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
	src.(interface{ CloseWrite() error }).CloseWrite()
	n := <-sunk
	b.StopTimer()
	if want := int64(b.N) * int64(len(chunk)); n != want {
		b.Fatalf("received %d bytes, sent %d", n, want)
	}
	io.Copy(io.Discard, src) // the sink's EOF
}
