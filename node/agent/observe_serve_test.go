package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestServeStreamsEndsStreams: when the agent stops, a stream whose
// handler follows its request's context ends at once, and one that
// ignores it is cut after the grace; serveStreams returns only then.
func TestServeStreamsEndsStreams(t *testing.T) {
	for _, follows := range []bool{true, false} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		handlerDone := make(chan struct{})
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			defer close(handlerDone)
			rc := http.NewResponseController(w)
			for {
				if follows && r.Context().Err() != nil {
					return
				}
				if _, err := w.Write([]byte("x")); err != nil {
					return
				}
				if rc.Flush() != nil {
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		})}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- serveStreams(ctx, srv, ln, 300*time.Millisecond) }()
		resp, err := http.Get("http://" + ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		go func() { _, _ = io.Copy(io.Discard, resp.Body); resp.Body.Close() }() // a reader that keeps reading
		time.Sleep(50 * time.Millisecond)
		start := time.Now()
		cancel()
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("follows ctx %v: %v", follows, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("follows ctx %v: still serving a stream 5s after stop", follows)
		}
		select {
		case <-handlerDone:
		case <-time.After(2 * time.Second):
			t.Fatalf("follows ctx %v: the stream's handler still runs", follows)
		}
		if d := time.Since(start); follows && d > 200*time.Millisecond {
			t.Fatalf("a stream that follows its context took %s to end", d)
		}
	}
}
