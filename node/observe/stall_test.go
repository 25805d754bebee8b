package observe

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/flowlog"
)

// stalledWriter is a response whose reader never reads: every write
// blocks until the write deadline (forever without one).
type stalledWriter struct {
	header   http.Header
	mu       sync.Mutex
	deadline time.Time
	gone     chan struct{}
}

func (w *stalledWriter) Header() http.Header { return w.header }
func (w *stalledWriter) WriteHeader(int)     {}
func (w *stalledWriter) FlushError() error   { return nil }

func (w *stalledWriter) SetWriteDeadline(d time.Time) error {
	w.mu.Lock()
	w.deadline = d
	w.mu.Unlock()
	return nil
}

func (w *stalledWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	d := w.deadline
	w.mu.Unlock()
	if d.IsZero() {
		<-w.gone
		return 0, os.ErrClosed
	}
	select {
	case <-time.After(time.Until(d)):
		return 0, os.ErrDeadlineExceeded
	case <-w.gone:
		return 0, os.ErrClosed
	}
}

// TestTapStalledReaderEnds: a tap whose reader stops reading ends after
// the per-write timeout and unsubscribes.
func TestTapStalledReaderEnds(t *testing.T) {
	e := newEnvWith(t, func(c *Config) { c.TapWriteTimeout = 200 * time.Millisecond })
	w := &stalledWriter{header: http.Header{}, gone: make(chan struct{})}
	t.Cleanup(func() { close(w.gone) })
	r := httptest.NewRequest("GET", TapPath+"?namespace=shop", nil)
	r.Header.Set("Authorization", "Bearer alice")
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.h.ServeHTTP(w, r)
	}()
	go func() {
		for i := 0; i < 20; i++ {
			time.Sleep(20 * time.Millisecond)
			tr := e.log.Open(flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.1.0.5:5000"), Dst: netip.MustParseAddrPort("10.1.1.9:80"), TLS: flowlog.TLSTrue})
			tr.Close(1, 2, "clean")
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("tap still streaming to a reader that stopped reading")
	}
}
