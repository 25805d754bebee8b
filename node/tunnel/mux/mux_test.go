package mux_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// leakCheck fails the test if it leaves goroutines behind.
func leakCheck(t *testing.T) {
	t.Helper()
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > base {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("%d goroutines left, %d before:\n%s", runtime.NumGoroutine(), base, buf)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

// pair starts a client and a server session over loopback TLS 1.3; handle
// runs the server's streams. Both end with the test.
func pair(t testing.TB, cfg mux.Config, handle func(*mux.Stream)) (client, server *mux.Session) {
	t.Helper()
	c, s := tunneltest.TLSPair(t)
	client = mux.Client(c, cfg)
	server = mux.Server(s, cfg, handle)
	t.Cleanup(func() {
		client.Close()
		server.Close()
		client.Wait()
		server.Wait()
	})
	return client, server
}

// echo accepts a stream and sends back what it reads, then ends cleanly.
func echo(st *mux.Stream) {
	if err := st.Accept(); err != nil {
		st.Abort()
		return
	}
	if _, err := io.Copy(st, st); err != nil {
		st.Abort()
		return
	}
	st.CloseWrite()
	st.Close()
}

var hdr = []byte("header")

func TestStreamsEchoConcurrently(t *testing.T) {
	leakCheck(t)
	client, server := pair(t, mux.Config{}, echo)
	defer func() { t.Logf("server %v client %v", server.Err(), client.Err()) }()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.OpenStream(hdr, false)
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			size := 1<<20 + i*777
			data := make([]byte, size)
			for j := range data {
				data[j] = byte(i + j)
			}
			go func() {
				st.Write(data)
				st.CloseWrite()
			}()
			got, err := io.ReadAll(st)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if sha256.Sum256(got) != sha256.Sum256(data) {
				errs <- fmt.Errorf("stream %d: got %d bytes, sent %d, checksums differ", i, len(got), len(data))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n, _, _ := client.Load(); n != 0 {
		t.Errorf("%d streams left open after clean ends", n)
	}
}

func TestRefusalIsTheFirstRead(t *testing.T) {
	leakCheck(t)
	refused := make(chan []byte, 1)
	wrote := make(chan struct{})
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		refused <- st.Payload()
		<-wrote // the server's checks take a while
		st.Refuse(tunnel.ReasonPolicy)
	})
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	// Data goes out before the reply (no round trip); the server drops it.
	if _, err := st.Write([]byte("early bytes")); err != nil {
		t.Fatalf("write before the reply: %v", err)
	}
	close(wrote)
	_, err = st.Read(make([]byte, 10))
	var re *tunnel.RefusedError
	if !errors.As(err, &re) || re.Reason != tunnel.ReasonPolicy {
		t.Fatalf("read = %v, want a policy refusal", err)
	}
	if got := <-refused; !bytes.Equal(got, hdr) {
		t.Errorf("server saw payload %q, want %q", got, hdr)
	}
	if err := st.WaitReply(t.Context()); !errors.As(err, &re) {
		t.Errorf("WaitReply = %v, want the refusal", err)
	}
	// The session goes on.
	client2 := client
	st2, err := client2.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st2.Read(make([]byte, 1)); !errors.As(err, &re) {
		t.Fatalf("second stream: %v", err)
	}
}

func TestResetBothWays(t *testing.T) {
	leakCheck(t)
	serverErr := make(chan error, 1)
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		_, err := io.Copy(io.Discard, st)
		serverErr <- err
		st.Abort()
	})
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	st.Write([]byte("some"))
	if err := st.WaitReply(t.Context()); err != nil {
		t.Fatal(err)
	}
	st.Abort()
	if err := <-serverErr; !errors.Is(err, tunnel.ErrPeerReset) {
		t.Fatalf("server read after client abort = %v, want ErrPeerReset", err)
	}
	if tunnel.EndOf(fmt.Errorf("x: %w", tunnel.ErrPeerReset)) != "reset" {
		t.Fatal("EndOf")
	}

	// Server aborts: the client's read is a reset, not an EOF.
	client2, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		st.Write([]byte("partial"))
		st.Abort()
	})
	st, err = client2.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(st)
	if !errors.Is(err, tunnel.ErrPeerReset) {
		t.Fatalf("client read after server abort = %v, want ErrPeerReset", err)
	}
}

func TestCutConnectionCutsEveryStream(t *testing.T) {
	leakCheck(t)
	c, s := tunneltest.TLSPair(t)
	client := mux.Client(c, mux.Config{})
	server := mux.Server(s, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		io.Copy(io.Discard, st)
	})
	defer func() { client.Close(); server.Close(); client.Wait(); server.Wait() }()
	var streams []*mux.Stream
	for range 5 {
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.WaitReply(t.Context()); err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	s.NetConn().Close() // the server agent dies
	for i, st := range streams {
		_, err := st.Read(make([]byte, 1))
		if err == nil || errors.Is(err, io.EOF) || !errors.Is(err, io.ErrUnexpectedEOF) || !errors.Is(err, mux.ErrConnLost) {
			t.Errorf("stream %d read after the cut = %v, want ErrConnLost (never EOF)", i, err)
		}
		if got := tunnel.EndOf(err); got != "truncated" {
			t.Errorf("EndOf = %q, want truncated", got)
		}
		if _, err := st.Write([]byte("x")); err == nil {
			t.Errorf("stream %d write after the cut succeeded", i)
		}
	}
	if _, err := client.OpenStream(hdr, false); err == nil {
		t.Error("open on a dead session succeeded")
	}
}

// TestNoHeadOfLineBlocking: a stream whose reader stalls (its pod does not
// read) fills its own window and no more; another stream on the same
// connection keeps its round trips.
func TestNoHeadOfLineBlocking(t *testing.T) {
	leakCheck(t)
	stall := make(chan struct{})
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		if bytes.Equal(st.Payload(), []byte("stall")) {
			<-stall
			io.Copy(io.Discard, st)
			st.Close()
			return
		}
		echo2(st)
	})
	defer close(stall)
	slow, err := client.OpenStream([]byte("stall"), false)
	if err != nil {
		t.Fatal(err)
	}
	wrote := make(chan int, 1)
	go func() {
		slow.SetWriteDeadline(time.Now().Add(2 * time.Second))
		n, _ := slow.Write(make([]byte, 2*mux.StreamWindow))
		wrote <- n
	}()
	fast, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1024)
	start := time.Now()
	for range 100 {
		if _, err := fast.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(fast, buf); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("100 round trips took %v next to a stalled stream", d)
	}
	if n := <-wrote; n != mux.StreamWindow {
		t.Errorf("stalled stream took %d bytes, want exactly its window %d", n, mux.StreamWindow)
	}
	fast.CloseWrite()
	io.Copy(io.Discard, fast)
	fast.Close()
	slow.Abort()
}

// echo2 echoes without ending the write side first (a ping-pong server).
func echo2(st *mux.Stream) {
	io.Copy(st, st)
	st.CloseWrite()
	st.Close()
}

func TestMaxStreamsRefusesBusy(t *testing.T) {
	leakCheck(t)
	hold := make(chan struct{})
	client, _ := pair(t, mux.Config{MaxStreams: 2}, func(st *mux.Stream) {
		st.Accept()
		<-hold
		st.Abort()
	})
	var open []*mux.Stream
	for range 2 {
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.WaitReply(t.Context()); err != nil {
			t.Fatal(err)
		}
		open = append(open, st)
	}
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	var re *tunnel.RefusedError
	if err := st.WaitReply(t.Context()); !errors.As(err, &re) || re.Reason != tunnel.ReasonBusy {
		t.Fatalf("third stream: %v, want refused busy", err)
	}
	close(hold)
	for _, st := range open {
		st.Abort()
	}
}

// rawServer runs a server session on one end of a pipe and returns the
// other end to write raw frames into.
func rawServer(t *testing.T, handle func(*mux.Stream)) (net.Conn, *mux.Session) {
	t.Helper()
	return rawServerConfig(t, mux.Config{}, handle)
}

func rawServerConfig(t *testing.T, cfg mux.Config, handle func(*mux.Stream)) (net.Conn, *mux.Session) {
	t.Helper()
	a, b := net.Pipe()
	s := mux.Server(b, cfg, handle)
	t.Cleanup(func() { a.Close(); s.Close(); s.Wait() })
	return a, s
}

func frame(typ byte, flags byte, stream uint32, payload []byte) []byte {
	b := []byte{typ, flags}
	b = binary.BigEndian.AppendUint16(b, uint16(len(payload)))
	b = binary.BigEndian.AppendUint32(b, stream)
	return append(b, payload...)
}

func win(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }

func TestProtocolErrorsCloseTheConnection(t *testing.T) {
	open1 := frame(mux.FrameOpen, 0, 1, hdr)
	big := make([]byte, mux.MaxPayload)
	for _, tc := range []struct {
		name   string
		frames [][]byte
	}{
		{"unknown type", [][]byte{frame(0x7f, 0, 1, nil)}},
		{"flags set", [][]byte{frame(mux.FrameData, 1, 1, []byte("x"))}},
		{"oversized", [][]byte{append(frame(mux.FrameData, 0, 1, nil)[:2], 0xff, 0xff, 0, 0, 0, 1)}},
		{"data for a stream never opened", [][]byte{frame(mux.FrameData, 0, 3, []byte("x"))}},
		{"empty data", [][]byte{open1, frame(mux.FrameData, 0, 1, nil)}},
		{"end with payload", [][]byte{open1, frame(mux.FrameEnd, 0, 1, []byte("x"))}},
		{"even stream id", [][]byte{frame(mux.FrameOpen, 0, 2, hdr)}},
		{"stream id reused", [][]byte{open1, frame(mux.FrameOpen, 0, 1, hdr)}},
		{"reply from a client", [][]byte{open1, frame(mux.FrameReply, 0, 1, []byte{tunnel.ReplyOK})}},
		{"zero window update", [][]byte{frame(mux.FrameWindow, 0, 0, win(0))}},
		{"window overflow", [][]byte{frame(mux.FrameWindow, 0, 0, win(1<<31-1))}},
		{"data after end", [][]byte{open1, frame(mux.FrameEnd, 0, 1, nil), frame(mux.FrameData, 0, 1, []byte("x"))}},
		{"past the stream window", append([][]byte{open1}, slices.Repeat([][]byte{frame(mux.FrameData, 0, 1, big)}, mux.StreamWindow/mux.MaxPayload+1)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakCheck(t)
			conn, s := rawServer(t, func(st *mux.Stream) { <-st.Session().Done() })
			go func() {
				for _, f := range tc.frames {
					if _, err := conn.Write(f); err != nil {
						return
					}
				}
			}()
			select {
			case <-s.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("session still up after a protocol error")
			}
			if err := s.Err(); !errors.Is(err, mux.ErrProtocol) {
				t.Errorf("session ended with %v, want ErrProtocol", err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, conn); err != nil && !errors.Is(err, io.ErrClosedPipe) {
				t.Errorf("connection not closed: %v", err)
			}
		})
	}
}

// TestLateFramesAreIgnored: frames for a stream that ended here (the
// client had not seen the refusal yet) are not protocol errors.
func TestLateFramesAreIgnored(t *testing.T) {
	leakCheck(t)
	conn, s := rawServer(t, func(st *mux.Stream) { st.Refuse(tunnel.ReasonPolicy) })
	go io.Copy(io.Discard, conn)
	for _, f := range [][]byte{
		frame(mux.FrameOpen, 0, 1, hdr),
		frame(mux.FrameData, 0, 1, []byte("early")),
	} {
		conn.Write(f)
	}
	time.Sleep(50 * time.Millisecond) // the refusal happened
	for _, f := range [][]byte{
		frame(mux.FrameData, 0, 1, []byte("late")),
		frame(mux.FrameEnd, 0, 1, nil),
		frame(mux.FrameReset, 0, 1, nil),
		frame(mux.FrameWindow, 0, 1, win(10)),
	} {
		if _, err := conn.Write(f); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Err(); err != nil {
		t.Fatalf("session ended on late frames: %v", err)
	}
}

// TestFlowControlRefills: far more than both windows crosses one stream
// (the receiver's updates keep the sender going) and many streams at once.
func TestFlowControlRefills(t *testing.T) {
	leakCheck(t)
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		n, err := io.Copy(io.Discard, st)
		if err == nil {
			st.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
		}
		st.CloseWrite()
		st.Close()
	})
	const size = 3 * mux.ConnWindow
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 100_000)
	rand.Shuffle(len(chunk), func(i, j int) { chunk[i], chunk[j] = chunk[j], chunk[i] })
	for sent := 0; sent < size; sent += len(chunk) {
		if _, err := st.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	st.CloseWrite()
	got, err := io.ReadAll(st)
	if err != nil || len(got) != 8 {
		t.Fatalf("reply %x, %v", got, err)
	}
	if n := binary.BigEndian.Uint64(got); n < size {
		t.Fatalf("server read %d bytes, want %d", n, size)
	}
	st.Close()
}

func TestDeadlines(t *testing.T) {
	leakCheck(t)
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		io.Copy(io.Discard, st)
		st.Close()
	})
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	if _, err := st.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read = %v, want a deadline error", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("deadline took %v", d)
	}
	st.Abort()
}

// TestReplyTimeoutCutsTheStream: a server that never answers a stream
// gets it cut (an error, not a clean end) after ReplyTimeout; answered
// streams are not affected by the timer.
func TestReplyTimeoutCutsTheStream(t *testing.T) {
	leakCheck(t)
	c, s := tunneltest.TLSPair(t)
	client := mux.Client(c, mux.Config{ReplyTimeout: 100 * time.Millisecond})
	server := mux.Server(s, mux.Config{}, func(st *mux.Stream) {
		if bytes.Equal(st.Payload(), []byte("silent")) {
			<-st.Session().Done()
			return
		}
		echo(st)
	})
	defer func() { client.Close(); server.Close(); client.Wait(); server.Wait() }()
	silent, err := client.OpenStream([]byte("silent"), false)
	if err != nil {
		t.Fatal(err)
	}
	answered, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = silent.Read(make([]byte, 1))
	if !errors.Is(err, mux.ErrReplyTimeout) || errors.Is(err, net.ErrClosed) {
		t.Fatalf("read of an unanswered stream = %v, want ErrReplyTimeout", err)
	}
	time.Sleep(200 * time.Millisecond)
	answered.Write([]byte("still here"))
	answered.CloseWrite()
	got, err := io.ReadAll(answered)
	if err != nil || string(got) != "still here" {
		t.Fatalf("answered stream: %q, %v", got, err)
	}
	answered.Close()
	// A server that let a reply time out may be gone: the session takes
	// no new stream (the pool dials anew).
	if client.Reserve() {
		t.Error("a session with a timed-out reply still takes new streams")
	}
}

// TestAbortWakesWriterWaitingForConnectionWindow: a writer blocked on the
// connection's window (not its stream's) returns when its stream is
// aborted, so a splice never hangs on a cut stream.
func TestAbortWakesWriterWaitingForConnectionWindow(t *testing.T) {
	leakCheck(t)
	stall := make(chan struct{})
	client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		<-stall
		st.Abort()
	})
	defer close(stall)
	// Four streams fill the connection window (4 x 4 MiB = 16 MiB).
	for range mux.ConnWindow / mux.StreamWindow {
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			t.Fatal(err)
		}
		if n, err := st.Write(make([]byte, mux.StreamWindow)); err != nil || n != mux.StreamWindow {
			t.Fatalf("filling write: %d, %v", n, err)
		}
	}
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := st.Write(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	st.Abort()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("write on an aborted stream succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("writer still blocked on the connection window after Abort")
	}
}

// countingConn counts the writes to a connection.
type countingConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, append([]byte(nil), p...))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// TestOpenLeavesWithTheFirstBytes: the Open frame (the tunnel header) and
// the stream's first bytes leave in one write (one TLS record); a stream
// that only reads (a server-first protocol) sends its Open when it starts
// waiting.
func TestOpenLeavesWithTheFirstBytes(t *testing.T) {
	leakCheck(t)
	a, b := net.Pipe()
	cc := &countingConn{Conn: a}
	client := mux.Client(cc, mux.Config{})
	server := mux.Server(b, mux.Config{}, func(st *mux.Stream) {
		st.Accept()
		if bytes.Equal(st.Payload(), []byte("server-first")) {
			st.Write([]byte("banner"))
		}
		io.Copy(io.Discard, st)
		st.CloseWrite()
		st.Close()
	})
	defer func() { client.Close(); server.Close(); client.Wait(); server.Wait() }()
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write([]byte("GET / HTTP/1.1\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	cc.mu.Lock()
	first := cc.writes[0]
	cc.mu.Unlock()
	if len(first) != 2*mux.HeaderLen+len(hdr)+18 || first[0] != mux.FrameOpen || first[mux.HeaderLen+len(hdr)] != mux.FrameData {
		t.Errorf("first connection write = % x, want the Open and the first Data frame together", first)
	}
	st.Abort()

	// Server-first: nothing to write; reading sends the Open.
	st, err = client.OpenStream([]byte("server-first"), false)
	if err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 6)
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "banner" {
		t.Fatalf("server-first stream read %q, %v", buf, err)
	}
	st.Abort()
}

// TestResetStreamCountsUntilItsHandlerReturns: a client that opens and at
// once resets streams does not get more handlers running than MaxStreams
// (each reset stream's handler may still be checking or dialling), and a
// Reset cancels its handler's Context.
func TestResetStreamCountsUntilItsHandlerReturns(t *testing.T) {
	leakCheck(t)
	release := make(chan struct{})
	cancelled := make(chan uint32, 8)
	var running sync.WaitGroup
	conn, s := rawServerConfig(t, mux.Config{MaxStreams: 2}, func(st *mux.Stream) {
		running.Add(1)
		defer running.Done()
		<-st.Context().Done()
		cancelled <- st.ID()
		<-release // still busy after the reset (a dial that ignores ctx)
	})
	defer func() { s.Close(); close(release); running.Wait() }()
	replies := make(chan mux.Frame, 8)
	go func() {
		for {
			f, p, err := mux.ReadFrame(conn, nil)
			if err != nil {
				close(replies)
				return
			}
			if f.Type == mux.FrameReply && len(p) == 2 && p[1] == byte(tunnel.ReasonBusy) {
				replies <- f
			}
		}
	}()
	for _, id := range []uint32{1, 3} {
		conn.Write(frame(mux.FrameOpen, 0, id, hdr))
		conn.Write(frame(mux.FrameReset, 0, id, nil))
		select {
		case got := <-cancelled:
			if got != id {
				t.Fatalf("stream %d's context cancelled, want %d", got, id)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("reset of stream %d did not cancel its handler's context", id)
		}
	}
	conn.Write(frame(mux.FrameOpen, 0, 5, hdr))
	select {
	case f := <-replies:
		if f.Stream != 5 {
			t.Fatalf("busy refusal for stream %d, want 5", f.Stream)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("third stream accepted while two reset streams' handlers still run (MaxStreams 2)")
	}
	if n, _, _ := s.Load(); n != 2 {
		t.Errorf("server counts %d streams, want 2 running handlers", n)
	}
}

// TestUnacceptedStreamWindowIsSmall: before the server accepts a stream,
// the client may send only InitialStreamWindow bytes on it (more is a
// protocol error), and a client writer waits there; the ReplyOK grants
// the rest of the stream window.
func TestUnacceptedStreamWindowIsSmall(t *testing.T) {
	t.Run("raw client past the initial window", func(t *testing.T) {
		leakCheck(t)
		conn, s := rawServer(t, func(st *mux.Stream) { <-st.Session().Done() })
		go io.Copy(io.Discard, conn)
		conn.Write(frame(mux.FrameOpen, 0, 1, hdr))
		full := frame(mux.FrameData, 0, 1, make([]byte, mux.MaxPayload))
		for range mux.InitialStreamWindow / mux.MaxPayload {
			if _, err := conn.Write(full); err != nil {
				t.Fatal(err)
			}
		}
		conn.Write(frame(mux.FrameOpen, 0, 3, hdr)) // a marker: all the above was parsed
		waitFor(t, func() bool { n, _, _ := s.Load(); return n == 2 })
		if err := s.Err(); err != nil {
			t.Fatalf("session ended within the initial window: %v", err)
		}
		conn.Write(frame(mux.FrameData, 0, 1, []byte("x")))
		select {
		case <-s.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("a byte past the initial window of an unaccepted stream was taken")
		}
		if err := s.Err(); !errors.Is(err, mux.ErrProtocol) {
			t.Fatalf("session ended with %v, want ErrProtocol", err)
		}
	})
	t.Run("writer waits for the reply", func(t *testing.T) {
		leakCheck(t)
		accept := make(chan struct{})
		client, _ := pair(t, mux.Config{}, func(st *mux.Stream) {
			<-accept
			st.Accept()
			io.Copy(io.Discard, st)
			st.CloseWrite()
			st.Close()
		})
		st, err := client.OpenStream(hdr, false)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		st.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := st.Write(make([]byte, 1<<20))
		if !errors.Is(err, os.ErrDeadlineExceeded) || n != mux.InitialStreamWindow {
			t.Fatalf("before the reply: wrote %d, %v; want %d and a deadline", n, err, mux.InitialStreamWindow)
		}
		close(accept)
		st.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if n, err := st.Write(make([]byte, mux.StreamWindow-mux.InitialStreamWindow)); err != nil {
			t.Fatalf("after the reply: wrote %d, %v; want the rest of the stream window", n, err)
		}
	})
}

// TestServerSessionReaped: a server session closes itself (ErrIdle) when
// no Open comes within FirstOpenTimeout, or when it has had no stream for
// IdleTimeout; never while a stream is open.
func TestServerSessionReaped(t *testing.T) {
	ended := func(t *testing.T, s *mux.Session, within time.Duration) {
		t.Helper()
		select {
		case <-s.Done():
		case <-time.After(within):
			t.Fatalf("session still up after %s", within)
		}
		if err := s.Err(); !errors.Is(err, mux.ErrIdle) {
			t.Fatalf("session ended with %v, want ErrIdle", err)
		}
	}
	t.Run("no first open", func(t *testing.T) {
		leakCheck(t)
		conn, s := rawServerConfig(t, mux.Config{FirstOpenTimeout: 50 * time.Millisecond, IdleTimeout: time.Hour}, echo)
		go io.Copy(io.Discard, conn)
		ended(t, s, 5*time.Second)
	})
	t.Run("idle after its streams", func(t *testing.T) {
		leakCheck(t)
		const idle = 150 * time.Millisecond
		conn, s := rawServerConfig(t, mux.Config{FirstOpenTimeout: 50 * time.Millisecond, IdleTimeout: idle},
			func(st *mux.Stream) { <-st.Context().Done() })
		go io.Copy(io.Discard, conn)
		conn.Write(frame(mux.FrameOpen, 0, 1, hdr))
		time.Sleep(3 * idle) // a stream is open: not idle
		if err := s.Err(); err != nil {
			t.Fatalf("session with an open stream ended: %v", err)
		}
		conn.Write(frame(mux.FrameReset, 0, 1, nil))
		start := time.Now()
		ended(t, s, 5*time.Second)
		if d := time.Since(start); d < idle/2 {
			t.Errorf("closed %s after its last stream, want about %s", d, idle)
		}
	})
}

// TestUnreadAnswersAreBounded: a peer that opens streams past MaxStreams
// and never reads the busy refusals fails the session with a protocol
// error once MaxQueuedControlFrames are queued, instead of growing the
// write queue without bound.
func TestUnreadAnswersAreBounded(t *testing.T) {
	leakCheck(t)
	conn, s := rawServerConfig(t, mux.Config{MaxStreams: 1}, func(st *mux.Stream) { <-st.Context().Done() })
	go func() {
		// Never reads: net.Pipe's writes block until read, so the
		// server's first flush of refusals stays under way.
		for id := uint32(1); id < 4*mux.MaxQueuedControlFrames; id += 2 {
			if _, err := conn.Write(frame(mux.FrameOpen, 0, id, hdr)); err != nil {
				return
			}
		}
	}()
	select {
	case <-s.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("session still up with 2x MaxQueuedControlFrames refusals unread")
	}
	if err := s.Err(); !errors.Is(err, mux.ErrProtocol) {
		t.Fatalf("session ended with %v, want ErrProtocol", err)
	}
}

// TestPeerCertExpiry: a server session refuses Opens from its client's
// certificate's expiry on (Config.Expires) and closes ExpiryGrace later.
func TestPeerCertExpiry(t *testing.T) {
	leakCheck(t)
	const life = 150 * time.Millisecond
	conn, s := rawServerConfig(t, mux.Config{Expires: time.Now().Add(life), ExpiryGrace: life},
		func(st *mux.Stream) { <-st.Context().Done() })
	busy := make(chan uint32, 4)
	go func() {
		for {
			f, p, err := mux.ReadFrame(conn, nil)
			if err != nil {
				return
			}
			if f.Type == mux.FrameReply && len(p) == 2 && p[1] == byte(tunnel.ReasonBusy) {
				busy <- f.Stream
			}
		}
	}()
	conn.Write(frame(mux.FrameOpen, 0, 1, hdr))
	waitFor(t, func() bool { n, _, _ := s.Load(); return n == 1 })
	time.Sleep(life)
	conn.Write(frame(mux.FrameOpen, 0, 3, hdr))
	select {
	case id := <-busy:
		if id != 3 {
			t.Fatalf("stream %d refused, want 3", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("an Open after the client's certificate expired was not refused")
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session still up a grace after its client's certificate expired")
	}
	if err := s.Err(); !errors.Is(err, mux.ErrPeerCertExpired) {
		t.Fatalf("session ended with %v, want ErrPeerCertExpired", err)
	}
}

// TestDrain: a drained client session takes no new stream, keeps the
// ones it has, and CloseIfIdle closes it as soon as they have ended.
func TestDrain(t *testing.T) {
	leakCheck(t)
	client, _ := pair(t, mux.Config{}, echo)
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	client.Drain()
	if client.Reserve() {
		t.Fatal("a drained session took a reservation")
	}
	if _, _, closed := client.Load(); !closed {
		t.Fatal("a drained session reports it takes new streams")
	}
	if client.CloseIfIdle(time.Hour) {
		t.Fatal("a drained session with a stream was closed")
	}
	echoOnceMux(t, st, "still served")
	waitFor(t, func() bool { return client.CloseIfIdle(time.Hour) })
	if err := client.Err(); !errors.Is(err, mux.ErrSessionClosed) {
		t.Fatalf("drained session ended with %v", err)
	}
}

func echoOnceMux(t *testing.T, st *mux.Stream, msg string) {
	t.Helper()
	defer st.Close()
	if _, err := st.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	st.CloseWrite()
	got, err := io.ReadAll(st)
	if err != nil || string(got) != msg {
		t.Fatalf("echo: %q, %v", got, err)
	}
}

// TestAbortDoesNotWaitForTheConnection: Abort queues its Reset instead of
// writing it inline, so a splice ending (or a reply timer) is not held by
// a connection the peer is slow to read.
func TestAbortDoesNotWaitForTheConnection(t *testing.T) {
	leakCheck(t)
	a, b := net.Pipe() // nobody reads b: every write to a blocks
	client := mux.Client(a, mux.Config{})
	t.Cleanup(func() { client.Close(); b.Close(); client.Wait() })
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { st.Abort(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Abort blocked on a connection nobody reads")
	}
}

// TestConnectionWindowUpdatesDoNotAllocate: a connection window update
// wakes writers only if some wait (it used to make a channel each time).
func TestConnectionWindowUpdatesDoNotAllocate(t *testing.T) {
	leakCheck(t)
	const updates = 10000
	conn, s := rawServer(t, func(st *mux.Stream) { <-st.Context().Done() })
	go io.Copy(io.Discard, conn)
	var wire []byte
	for range updates {
		wire = append(wire, frame(mux.FrameWindow, 0, 0, win(1))...)
	}
	wire = append(wire, frame(mux.FrameOpen, 0, 1, hdr)...) // a marker
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := conn.Write(wire); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { n, _, _ := s.Load(); return n == 1 })
	runtime.ReadMemStats(&after)
	if n := after.Mallocs - before.Mallocs; n > updates/10 {
		t.Errorf("%d allocations for %d connection window updates", n, updates)
	}
}
