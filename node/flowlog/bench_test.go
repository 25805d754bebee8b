package flowlog

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// nopConn is a connection whose reads and writes cost nothing: what a
// benchmark of the wrapper measures is the wrapper and the parser.
type nopConn struct{ data []byte }

func (c *nopConn) Read(b []byte) (int, error)       { return copy(b, c.data), nil }
func (c *nopConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *nopConn) Close() error                     { return nil }
func (c *nopConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *nopConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *nopConn) SetDeadline(time.Time) error      { return nil }
func (c *nopConn) SetReadDeadline(time.Time) error  { return nil }
func (c *nopConn) SetWriteDeadline(time.Time) error { return nil }
func (c *nopConn) TryWrite(b []byte) (int, error)   { return len(b), nil }
func (c *nopConn) CloseWrite() error                { return nil }
func (c *nopConn) Abort()                           {}
func (c *nopConn) SetLinger(int) error              { return nil }

// BenchmarkObserve: the cost the accounting adds to a meshed connection's
// reads and writes (docs/observability.md quotes it):
//
//	off           no HTTP metrics, no tap: the connection is not wrapped
//	not-http      wrapped, the stream is not HTTP (given up after its first bytes)
//	http-body     wrapped, inside a large HTTP body (counted, not parsed)
//	http-small    wrapped, a small request and response per iteration
//	http-small-metrics  the same, counted in the HTTP series
func BenchmarkObserve(b *testing.B) {
	chunk := make([]byte, 16<<10)
	open := func(http bool) *Track {
		l := New(nil, nil, Options{HTTP: http})
		return l.Open(Conn{Proxy: Out, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	}
	openMetrics := func() *Track {
		m, err := NewMetrics(prometheus.NewRegistry(), 0)
		if err != nil {
			b.Fatal(err)
		}
		l := New(names, m, Options{HTTP: true})
		return l.Open(Conn{Proxy: In, Src: clientAddr, Dst: serverAddr, TLS: TLSTrue})
	}
	b.Run("off", func(b *testing.B) {
		c := open(false).Observe(&nopConn{data: chunk}, true)
		b.SetBytes(int64(2 * len(chunk)))
		for b.Loop() {
			_, _ = c.Read(chunk)
			_, _ = c.Write(chunk)
		}
	})
	b.Run("not-http", func(b *testing.B) {
		c := open(true).Observe(&nopConn{data: chunk}, true)
		b.SetBytes(int64(2 * len(chunk)))
		for b.Loop() {
			_, _ = c.Read(chunk)
			_, _ = c.Write(chunk)
		}
	})
	b.Run("http-body", func(b *testing.B) {
		c := open(true).Observe(&nopConn{data: chunk}, false)
		_, _ = c.Write([]byte("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"))
		b.SetBytes(int64(len(chunk)))
		for b.Loop() {
			_, _ = c.Write(chunk)
		}
	})
	b.Run("http-small", func(b *testing.B) {
		req := []byte("GET /api/items?id=42 HTTP/1.1\r\nHost: web.shop.svc:8080\r\nAccept: */*\r\n\r\n")
		rsp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n" + strings.Repeat("x", 64))
		// The pod is the server here: writes carry requests, reads responses.
		c := open(true).Observe(&nopConn{data: rsp}, false)
		buf := make([]byte, len(rsp))
		b.SetBytes(int64(len(req) + len(rsp)))
		b.ReportAllocs()
		for b.Loop() {
			_, _ = c.Write(req)
			_, _ = c.Read(buf)
		}
	})
	b.Run("http-small-metrics", func(b *testing.B) {
		req := []byte("GET /api/items?id=42 HTTP/1.1\r\nHost: web.shop.svc:8080\r\nAccept: */*\r\n\r\n")
		rsp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n" + strings.Repeat("x", 64))
		// The pod is the server here: writes carry requests, reads responses.
		c := openMetrics().Observe(&nopConn{data: rsp}, false)
		buf := make([]byte, len(rsp))
		b.SetBytes(int64(len(req) + len(rsp)))
		b.ReportAllocs()
		for b.Loop() {
			_, _ = c.Write(req)
			_, _ = c.Read(buf)
		}
	})
}
