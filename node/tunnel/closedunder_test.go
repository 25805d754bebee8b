package tunnel_test

import (
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

// TestConnClosedUnderSpliceIsAnAbort: a connection closed by someone else
// (even its owner, deliberately)
// while the splice runs (its reads then fail with net.ErrClosed) may have
// cut the stream short, so the other side must be aborted (the peer reads
// a reset), never closed cleanly (a FIN, which the peer would take for
// the complete stream), and the splice reports an error.
func TestConnClosedUnderSpliceIsAnAbort(t *testing.T) {
	leakCheck(t)
	for _, async := range []bool{false, true} {
		aPeer, a := tunneltest.TCPPair(t)
		b, bPeer := tunneltest.TCPPair(t)
		done := startSplice(async, a, b)
		// Some bytes cross, then a's agent end is closed under the splice.
		if _, err := aPeer.Write([]byte("part of a stream")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		bPeer.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(bPeer, buf[:16]); err != nil {
			t.Fatalf("async=%v: bytes did not cross: %v", async, err)
		}
		a.Close()
		select {
		case err := <-done:
			if err == nil || !errors.Is(err, net.ErrClosed) {
				t.Errorf("async=%v: splice returned %v, want the net.ErrClosed of the closed connection", async, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("async=%v: splice did not end", async)
		}
		_, err := bPeer.Read(buf)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("async=%v: the other side's peer read %v, want a reset (never a clean end)", async, err)
		}
	}
}

// noHalfClose is a connection whose CloseWrite reports that it cannot
// half-close (as flowlog's observer does over such a connection).
type noHalfClose struct {
	net.Conn
}

func (noHalfClose) CloseWrite() error { return errors.ErrUnsupported }

// TestSpliceUnsupportedHalfCloseEndsCleanly: a destination that cannot
// half-close (errors.ErrUnsupported) is treated as one without CloseWrite:
// the EOF ends the splice cleanly (both closed with a FIN), not as an abort.
func TestSpliceUnsupportedHalfCloseEndsCleanly(t *testing.T) {
	leakCheck(t)
	for _, async := range []bool{false, true} {
		aPeer, a := tunneltest.TCPPair(t)
		b, bPeer := tunneltest.TCPPair(t)
		done := startSplice(async, a, noHalfClose{b})
		if _, err := aPeer.Write([]byte("whole")); err != nil {
			t.Fatal(err)
		}
		aPeer.CloseWrite()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("async=%v: splice = %v, want a clean end", async, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("async=%v: splice did not end", async)
		}
		bPeer.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, err := io.ReadAll(bPeer); err != nil || string(b) != "whole" {
			t.Errorf("async=%v: peer read %q, %v; want the whole stream and a clean end", async, b, err)
		}
	}
}

// startSplice runs Splice (in a goroutine) or SpliceAsync between a and b
// and reports its error.
func startSplice(async bool, a, b net.Conn) <-chan error {
	done := make(chan error, 1)
	if async {
		tunnel.SpliceAsync(context.Background(), a, b, tunnel.SpliceOptions{}, func(_ tunnel.SpliceStats, err error) { done <- err })
	} else {
		go func() { _, err := tunnel.Splice(context.Background(), a, b, tunnel.SpliceOptions{}); done <- err }()
	}
	return done
}
