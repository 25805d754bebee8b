package mux_test

import (
	"errors"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// TestHoldOutlivesTheHandler: a handler that holds its stream and returns
// leaves its Context alive and the stream counted against MaxStreams
// (even once the peer reset it, as a running handler is), and
// Session.Wait waiting, until the hold is released. A client stream's
// Hold does nothing.
func TestHoldOutlivesTheHandler(t *testing.T) {
	leakCheck(t)
	type heldStream struct {
		st      *mux.Stream
		release func()
	}
	held := make(chan heldStream, 4)
	c, s := tunneltest.TLSPair(t)
	client := mux.Client(c, mux.Config{})
	server := mux.Server(s, mux.Config{MaxStreams: 1}, func(st *mux.Stream) {
		st.Accept()
		held <- heldStream{st, st.Hold()}
	})
	defer func() {
		client.Close()
		server.Close()
		client.Wait()
		server.Wait()
	}()
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WaitReply(t.Context()); err != nil {
		t.Fatal(err)
	}
	st.Hold()() // a client stream has nothing to hold: no effect
	var h heldStream
	select {
	case h = <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("handler did not run")
	}
	defer h.release()                 // runs before the deferred Wait, also after a failure
	time.Sleep(50 * time.Millisecond) // the handler has returned
	if err := h.st.Context().Err(); err != nil {
		t.Fatalf("held stream's context done after its handler returned: %v", err)
	}
	if n, _, _ := server.Load(); n != 1 {
		t.Errorf("server counts %d streams after the handler returned, want 1 (held)", n)
	}
	h.st.Abort() // the stream itself ends; the hold still counts
	if n, _, _ := server.Load(); n != 1 {
		t.Errorf("server counts %d streams after the held stream ended, want 1 until the release", n)
	}
	server.Close()
	waited := make(chan struct{})
	go func() { server.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("Session.Wait returned while a stream was held")
	case <-time.After(100 * time.Millisecond):
	}
	h.release()
	h.release() // idempotent
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("Session.Wait did not return after the release")
	}
	if err := h.st.Context().Err(); err == nil {
		t.Error("stream's context not done after the release")
	}
}

// TestHoldCountsAgainstMaxStreams: a held stream whose peer reset it
// still takes its MaxStreams slot, as a running handler does: a new Open
// is refused busy until the release.
func TestHoldCountsAgainstMaxStreams(t *testing.T) {
	leakCheck(t)
	held := make(chan func(), 4)
	client, _ := pair(t, mux.Config{MaxStreams: 1}, func(st *mux.Stream) {
		st.Accept()
		held <- st.Hold()
	})
	st, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WaitReply(t.Context()); err != nil {
		t.Fatal(err)
	}
	release := <-held
	defer release() // before pair's cleanup waits, also after a failure
	st.Abort()      // the client resets it: the server forgets the stream, the hold remains
	time.Sleep(50 * time.Millisecond)
	second, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	var re *tunnel.RefusedError
	if err := second.WaitReply(t.Context()); !errors.As(err, &re) || re.Reason != tunnel.ReasonBusy {
		t.Fatalf("second stream while the first is held: %v, want refused busy (MaxStreams 1)", err)
	}
	release()
	third, err := client.OpenStream(hdr, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := third.WaitReply(t.Context()); err != nil {
		t.Fatalf("third stream after the release: %v, want accepted", err)
	}
	third.Close()
	(<-held)()
}
