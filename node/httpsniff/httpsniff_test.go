package httpsniff

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// recorder logs events as lines; a fake clock advances 1ms per call.
type recorder struct {
	lines []string
	t     time.Time
}

func (r *recorder) now() time.Time { r.t = r.t.Add(time.Millisecond); return r.t }

func (r *recorder) parser() *Parser {
	return New(Callbacks{
		Request: func(q Request) {
			r.lines = append(r.lines, fmt.Sprintf("req %s %s %s", q.Method, q.Authority, q.Path))
		},
		Response: func(s Response) { r.lines = append(r.lines, fmt.Sprintf("rsp %d", s.Status)) },
		End:      func(e End) { r.lines = append(r.lines, fmt.Sprintf("end %d", e.ResponseLength)) },
	}, r.now)
}

// exchange is a conversation: c> client bytes, s> server bytes.
type step struct {
	client bool
	data   string
}

func c(s string) step { return step{true, s} }
func s(s string) step { return step{false, s} }

func run(steps []step, chunk int, close bool) ([]string, bool) {
	r := &recorder{t: time.Unix(0, 0)}
	p := r.parser()
	for _, st := range steps {
		b := []byte(st.data)
		for len(b) > 0 {
			n := len(b)
			if chunk > 0 {
				n = min(n, chunk)
			}
			if st.client {
				p.Client(b[:n])
			} else {
				p.Server(b[:n])
			}
			b = b[n:]
		}
	}
	active := p.Active()
	if close {
		p.Close()
	}
	return r.lines, active
}

func TestParser(t *testing.T) {
	cases := []struct {
		name       string
		steps      []step
		close      bool
		want       []string
		wantActive bool
	}{
		{"get with content-length",
			[]step{c("GET /a?b=1 HTTP/1.1\r\nHost: web.shop:8080\r\n\r\n"), s("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")}, false,
			[]string{"req GET web.shop:8080 /a?b=1", "rsp 200", "end 5"}, true},
		{"post with body, chunked response",
			[]step{c("POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"),
				s("HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n")}, false,
			[]string{"req POST x /p", "rsp 201", "end 9"}, true},
		{"pipelined keep-alive",
			[]step{c("GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
				s("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nAHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")}, false,
			[]string{"req GET h /1", "req GET h /2", "rsp 200", "end 1", "rsp 503", "end 0"}, true},
		{"chunked request body",
			[]step{c("PUT /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\n\r\n"),
				s("HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")}, false,
			[]string{"req PUT  /u", "req GET  /n", "rsp 204", "end 0", "rsp 200", "end 2"}, true},
		{"head has no body",
			[]step{c("HEAD / HTTP/1.1\r\n\r\n"), s("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")}, false,
			[]string{"req HEAD  /", "rsp 200", "end 0"}, true},
		{"100 continue then response",
			[]step{c("POST / HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n"), s("HTTP/1.1 100 Continue\r\n\r\n"), c("z"),
				s("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")}, false,
			[]string{"req POST  /", "rsp 200", "end 0"}, true},
		{"response until close (HTTP/1.0)",
			[]step{c("GET / HTTP/1.0\r\n\r\n"), s("HTTP/1.0 200 OK\r\n\r\nall of it")}, true,
			[]string{"req GET  /", "rsp 200", "end 9"}, true},
		{"not http: TLS client hello", []step{c("\x16\x03\x01\x02\x00\x01"), s("\x16\x03\x03")}, false, nil, false},
		{"not http: a protocol that starts with G", []step{c("GXYZ")}, false, nil, false},
		{"server speaks first (not http)", []step{s("SSH-2.0-OpenSSH\r\n")}, false, nil, false},
		{"upgrade stops the parser",
			[]step{c("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"), s("HTTP/1.1 101 Switching\r\n\r\n\x81\x05hello")}, false,
			[]string{"req GET  /ws"}, false},
		{"connect is not followed", []step{c("CONNECT a:443 HTTP/1.1\r\n\r\n")}, false, nil, false},
		{"oversized header gives up",
			[]step{c("GET / HTTP/1.1\r\nX: " + strings.Repeat("a", MaxHeaderBytes) + "\r\n\r\n")}, false, nil, false},
		{"bad content-length gives up", []step{c("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")}, false, nil, false},
		{"gzip transfer-encoding gives up", []step{c("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")}, false, nil, false},
		{"response without request gives up", []step{c("GET / HTTP/1.1\r\n\r\n"), s("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")}, false,
			[]string{"req GET  /", "rsp 200", "end 0"}, false},
		{"bad chunk size gives up",
			[]step{c("GET / HTTP/1.1\r\n\r\n"), s("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")}, false,
			[]string{"req GET  /", "rsp 200"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, chunk := range []int{0, 1, 3, 7} {
				got, active := run(tc.steps, chunk, tc.close)
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("chunk %d: events\n%q\nwant\n%q", chunk, got, tc.want)
				}
				if active != tc.wantActive {
					t.Fatalf("chunk %d: active %v, want %v", chunk, active, tc.wantActive)
				}
			}
		})
	}
}

func TestLatencies(t *testing.T) {
	var rsp Response
	var end End
	clock := time.Unix(100, 0)
	p := New(Callbacks{Response: func(r Response) { rsp = r }, End: func(e End) { end = e }}, func() time.Time { return clock })
	p.Client([]byte("GET / HTTP/1.1\r\n\r\n"))
	clock = clock.Add(30 * time.Millisecond)
	p.Server([]byte("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"))
	clock = clock.Add(20 * time.Millisecond)
	p.Server([]byte("cd"))
	if rsp.Latency != 30*time.Millisecond || end.Duration != 50*time.Millisecond || end.ResponseLength != 4 {
		t.Fatalf("latency %v duration %v length %d", rsp.Latency, end.Duration, end.ResponseLength)
	}
}

// FuzzParser: any bytes, split anywhere, never panic, and the events do
// not depend on how the bytes were split.
func FuzzParser(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), []byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), uint8(3))
	f.Add([]byte("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"), []byte("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), uint8(1))
	f.Add([]byte("\x16\x03\x01"), []byte("x"), uint8(2))
	f.Fuzz(func(t *testing.T, cl, sv []byte, split uint8) {
		whole, wa := run([]step{c(string(cl)), s(string(sv))}, 0, true)
		parts, pa := run([]step{c(string(cl)), s(string(sv))}, int(split)+1, true)
		if wa != pa || !reflect.DeepEqual(whole, parts) {
			t.Fatalf("split %d changes the result: %q (%v) vs %q (%v)", split, whole, wa, parts, pa)
		}
	})
}

// BenchmarkParser: the cost per request/response of a small exchange, and
// the cost of a stream that is not HTTP (checked once, then skipped).
func BenchmarkParser(b *testing.B) {
	req := []byte("GET /api/items?id=42 HTTP/1.1\r\nHost: web.shop.svc:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
	rsp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n" + strings.Repeat("x", 64))
	b.Run("http1-exchange", func(b *testing.B) {
		p := New(Callbacks{Request: func(Request) {}, Response: func(Response) {}, End: func(End) {}}, nil)
		b.SetBytes(int64(len(req) + len(rsp)))
		b.ReportAllocs()
		for b.Loop() {
			p.Client(req)
			p.Server(rsp)
		}
		if !p.Active() {
			b.Fatal("parser gave up")
		}
	})
	b.Run("body-64KiB", func(b *testing.B) {
		p := New(Callbacks{}, nil)
		body := make([]byte, 64<<10)
		p.Client([]byte("POST / HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n"))
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			p.Client(body)
		}
	})
	b.Run("not-http-64KiB", func(b *testing.B) {
		p := New(Callbacks{}, nil)
		p.Client([]byte("\x16\x03\x01"))
		body := make([]byte, 64<<10)
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			p.Client(body)
			p.Server(body)
		}
	})
}
