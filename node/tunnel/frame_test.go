package tunnel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// TestFramedCleanEnd: data, then CloseWrite, arrive as the data and io.EOF,
// over TLS as in the mesh, with payloads larger than one frame.
func TestFramedCleanEnd(t *testing.T) {
	c, s := tunneltest.TLSPair(t)
	fc, fs := tunnel.NewFramedConn(c), tunnel.NewFramedConn(s)
	payload := bytes.Repeat([]byte("0123456789abcdef"), 10000) // 160 KB: many frames
	go func() {
		_, _ = fc.Write(payload)
		_ = fc.CloseWrite()
	}()
	got, err := io.ReadAll(fs)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("got %d bytes, want %d", len(got), len(payload))
	}
}

// TestFramedCutIsAnError: a tunnel that ends without an End frame (the
// peer agent died: its kernel sent a FIN, or TLS close_notify without End)
// is an error wrapping io.ErrUnexpectedEOF, never a clean io.EOF.
func TestFramedCutIsAnError(t *testing.T) {
	for _, tc := range []struct {
		name string
		cut  func(c net.Conn)
	}{
		{"tls close", func(c net.Conn) { c.Close() }},
		{"tcp fin underneath", func(c net.Conn) { c.(interface{ NetConn() net.Conn }).NetConn().Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := tunneltest.TLSPair(t)
			fc, fs := tunnel.NewFramedConn(c), tunnel.NewFramedConn(s)
			if _, err := fc.Write([]byte("partial body")); err != nil {
				t.Fatal(err)
			}
			tc.cut(c)
			got, err := io.ReadAll(fs)
			if string(got) != "partial body" {
				t.Errorf("got %q before the cut", got)
			}
			if !errors.Is(err, io.ErrUnexpectedEOF) || tunnel.EndOf(err) != "truncated" {
				t.Fatalf("err = %v (end %q), want a truncation", err, tunnel.EndOf(err))
			}
		})
	}
}

// TestFramedAbortIsReset: Abort reaches the peer as ErrPeerReset.
func TestFramedAbortIsReset(t *testing.T) {
	c, s := tunneltest.TLSPair(t)
	fc, fs := tunnel.NewFramedConn(c), tunnel.NewFramedConn(s)
	fc.Abort()
	_, err := io.ReadAll(fs)
	if tunnel.EndOf(err) != "reset" {
		t.Fatalf("err = %v (end %q), want a reset", err, tunnel.EndOf(err))
	}
}

// TestFramedInvalidFrames: frames the version does not define are errors.
func TestFramedInvalidFrames(t *testing.T) {
	for name, in := range map[string][]byte{
		"unknown type":     {0x07, 0, 0},
		"empty data frame": {tunnel.FrameData, 0, 0},
		"oversized data":   {tunnel.FrameData, 0xff, 0xff},
		"end with payload": {tunnel.FrameEnd, 0, 1, 'x'},
	} {
		t.Run(name, func(t *testing.T) {
			c, s := tunneltest.TCPPair(t)
			fs := tunnel.NewFramedConn(s)
			if _, err := c.Write(in); err != nil {
				t.Fatal(err)
			}
			_ = c.CloseWrite()
			_, err := io.ReadAll(fs)
			if !errors.Is(err, tunnel.ErrInvalidFrame) {
				t.Fatalf("err = %v, want ErrInvalidFrame", err)
			}
		})
	}
}

// TestSpliceCutReachesPodAsReset is the mesh's promise for truncation: a
// client pod reading a response through its agent sees a reset, not a
// clean end, when the server side's agent dies mid-stream. The pod side
// is a real TCP connection (as a pod's socket would be); the far agent's
// death is its tunnel connection closing without an End frame.
func TestSpliceCutReachesPodAsReset(t *testing.T) {
	podApp, agentSide := tunneltest.TCPPair(t)    // the client pod's socket, the agent's end
	tunClient, tunServer := tunneltest.TLSPair(t) // the tunnel between the agents
	done := make(chan error, 1)
	go func() {
		_, err := tunnel.Splice(context.Background(), agentSide, tunnel.NewFramedConn(tunClient), tunnel.SpliceOptions{})
		done <- err
	}()
	far := tunnel.NewFramedConn(tunServer)
	if _, err := far.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst part")); err != nil {
		t.Fatal(err)
	}
	tunServer.NetConn().Close() // the far agent dies: FIN, no End frame

	_ = podApp.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(podApp)
	if !bytes.HasSuffix(got, []byte("first part")) {
		t.Errorf("pod got %q", got)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("pod read ended with %v, want ECONNRESET (a cut must not look like a clean end)", err)
	}
	if err := <-done; tunnel.EndOf(err) != "truncated" {
		t.Errorf("splice ended with %v (%s), want truncated", err, tunnel.EndOf(err))
	}
}

// TestSplicePodResetCrossesTunnel: a reset of the server pod's connection
// reaches the client pod as a reset, through two splices and the tunnel.
func TestSplicePodResetCrossesTunnel(t *testing.T) {
	clientApp, clientAgent := tunneltest.TCPPair(t)
	serverAgent, serverApp := tunneltest.TCPPair(t)
	tunClient, tunServer := tunneltest.TLSPair(t)
	go func() {
		_, _ = tunnel.Splice(context.Background(), clientAgent, tunnel.NewFramedConn(tunClient), tunnel.SpliceOptions{})
	}()
	go func() {
		_, _ = tunnel.Splice(context.Background(), tunnel.NewFramedConn(tunServer), serverAgent, tunnel.SpliceOptions{})
	}()
	if _, err := serverApp.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	_ = serverApp.SetLinger(0)
	serverApp.Close() // the server pod resets its connection
	_ = clientApp.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.ReadAll(clientApp)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client pod read ended with %v, want ECONNRESET", err)
	}
}

// TestFramedCloseAfterCleanEndKeepsTail: the side that finishes last may
// still hold bytes of its peer unread when it closes (the peer's TLS
// close_notify follows its End frame and can arrive after the End was
// read). Closing a TCP socket with unread bytes makes Linux reset it and
// drop what it has not sent yet: the tail of the stream would reach the
// peer as a reset. Close reads the peer's last bytes first, so the peer
// gets every byte and a clean end.
func TestFramedCloseAfterCleanEndKeepsTail(t *testing.T) {
	c, s := tunneltest.TCPPair(t)
	// A small receive buffer on the reader and a large send buffer on the
	// writer: most of the payload is still in the writer's kernel when it
	// closes.
	if err := c.SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := s.SetWriteBuffer(1 << 20); err != nil {
		t.Fatal(err)
	}
	client, server := tunnel.NewFramedConn(c), tunnel.NewFramedConn(s)

	// The client ends its direction: an End frame, then (as TLS's
	// close_notify would) more bytes once the server has read the End.
	if _, err := c.Write([]byte{tunnel.FrameEnd, 0, 0}); err != nil {
		t.Fatal(err)
	}
	if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("server read: %d, %v; want the client's end", n, err)
	}
	if _, err := c.Write([]byte("close_notify")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the bytes reach the server's kernel, unread

	payload := bytes.Repeat([]byte("tail"), 64<<10) // 256 KiB: fits the send buffer (net.core.wmem_max)
	if _, err := server.Write(payload); err != nil {
		t.Fatalf("server write: %v", err)
	}
	if err := server.CloseWrite(); err != nil {
		t.Fatalf("server close write: %v", err)
	}
	if err := server.Close(); err != nil {
		t.Fatalf("server close: %v", err)
	}

	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("client read %d of %d bytes, %v; want all and a clean end", len(got), len(payload), err)
	}
}
