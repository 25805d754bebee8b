package mux_test

// The measurement behind the choice of multiplexer (docs/tunnel-protocol.md):
// the same workloads over loopback TCP + TLS 1.3 for
//
//	v3      this package (own framing, 4 MiB stream / 16 MiB connection windows)
//	h2      golang.org/x/net/http2 CONNECT, HBONE-like, with the same windows
//	yamux   github.com/hashicorp/yamux, 4 MiB stream window (it has no
//	        connection window)
//	v2      no multiplexing: one TLS connection per stream (the old protocol)
//
// Run: go test -run '^$' -bench 'Mux(Bulk|RR|Open)' -benchtime 2s ./node/tunnel/mux/

import (
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/net/http2"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// bstream is what the workloads need of a stream.
type bstream interface {
	io.ReadWriter
	CloseWrite() error
	Close() error
}

// opener opens streams to a server that runs handler on each.
type opener func() (bstream, error)

var kindsCompared = []string{"v3", "h2", "yamux", "v2"}

func setupKind(b *testing.B, kind string, handler func(bstream)) opener {
	b.Helper()
	switch kind {
	case "v3":
		c, s := tunneltest.TLSPair(b)
		client := mux.Client(c, mux.Config{})
		server := mux.Server(s, mux.Config{MaxStreams: 1 << 16}, func(st *mux.Stream) {
			st.Accept()
			handler(st)
		})
		b.Cleanup(func() { client.Close(); server.Close(); client.Wait(); server.Wait() })
		return func() (bstream, error) { return client.OpenStream(hdr, false) }
	case "h2":
		return setupH2(b, handler)
	case "yamux":
		c, s := tunneltest.TLSPair(b)
		cfg := yamux.DefaultConfig()
		cfg.MaxStreamWindowSize = mux.StreamWindow
		cfg.EnableKeepAlive = false
		cfg.LogOutput = io.Discard
		cfg.AcceptBacklog = 4096
		client, err := yamux.Client(c, cfg)
		if err != nil {
			b.Fatal(err)
		}
		server, err := yamux.Server(s, cfg)
		if err != nil {
			b.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				st, err := server.AcceptStream()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() { defer wg.Done(); handler(yamuxStream{st}) }()
			}
		}()
		b.Cleanup(func() { client.Close(); server.Close(); wg.Wait() })
		return func() (bstream, error) {
			st, err := client.OpenStream()
			return yamuxStream{st}, err
		}
	case "v2":
		ccfg, scfg := tunneltest.TLSConfigs(b)
		ln, err := tls.Listen("tcp", "127.0.0.1:0", scfg)
		if err != nil {
			b.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					if _, err := tunnel.ReadHeader(c); err != nil {
						c.Close()
						return
					}
					tunnel.WriteReply(c, tunnel.ReasonNone)
					handler(tunnel.NewFramedConn(c))
				}()
			}
		}()
		b.Cleanup(func() { ln.Close(); wg.Wait() })
		addr := ln.Addr().String()
		h := tunnel.Header{Dst: netip.MustParseAddrPort("10.244.2.3:8080"), Src: netip.MustParseAddr("10.244.1.2")}
		return func() (bstream, error) {
			c, err := tls.Dial("tcp", addr, ccfg)
			if err != nil {
				return nil, err
			}
			if err := tunnel.WriteHeader(c, h); err != nil {
				return nil, err
			}
			if err := tunnel.ReadReply(c); err != nil {
				return nil, err
			}
			return tunnel.NewFramedConn(c), nil
		}
	}
	b.Fatalf("unknown kind %q", kind)
	return nil
}

type yamuxStream struct{ *yamux.Stream }

// CloseWrite: yamux's Close sends FIN and keeps reading until the peer's.
func (s yamuxStream) CloseWrite() error { return s.Stream.Close() }

// setupH2 is HBONE's shape: each stream an HTTP/2 CONNECT request whose
// request body carries client->server and response body server->client.
func setupH2(b *testing.B, handler func(bstream)) opener {
	c, s := tunneltest.TLSPair(b)
	srv := &http2.Server{MaxUploadBufferPerConnection: mux.ConnWindow, MaxUploadBufferPerStream: mux.StreamWindow, MaxConcurrentStreams: 1 << 16}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(s, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			handler(&h2ServerStream{r: r.Body, w: w, rc: http.NewResponseController(w)})
		})})
	}()
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{MaxReceiveBufferPerConnection: mux.ConnWindow, MaxReceiveBufferPerStream: mux.StreamWindow}}
	t2, err := http2.ConfigureTransports(t1)
	if err != nil {
		b.Fatal(err)
	}
	cc, err := t2.NewClientConn(c)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close(); s.Close(); <-done })
	return func() (bstream, error) {
		pr, pw := io.Pipe()
		req, err := http.NewRequest(http.MethodConnect, "https://10.244.2.3:8080", pr)
		if err != nil {
			return nil, err
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("CONNECT: %s", resp.Status)
		}
		return &h2ClientStream{body: resp.Body, pw: pw}, nil
	}
}

type h2ClientStream struct {
	body io.ReadCloser
	pw   *io.PipeWriter
}

func (s *h2ClientStream) Read(p []byte) (int, error)  { return s.body.Read(p) }
func (s *h2ClientStream) Write(p []byte) (int, error) { return s.pw.Write(p) }
func (s *h2ClientStream) CloseWrite() error           { return s.pw.Close() }
func (s *h2ClientStream) Close() error                { s.pw.Close(); return s.body.Close() }

type h2ServerStream struct {
	r  io.Reader
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (s *h2ServerStream) Read(p []byte) (int, error) { return s.r.Read(p) }
func (s *h2ServerStream) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err == nil {
		err = s.rc.Flush()
	}
	return n, err
}

// CloseWrite and Close: the response ends when the handler returns.
func (s *h2ServerStream) CloseWrite() error { return nil }
func (s *h2ServerStream) Close() error      { return nil }

// sink reads a stream to its end and answers the byte count.
func sink(st bstream) {
	n, _ := io.Copy(io.Discard, st)
	st.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
	st.CloseWrite()
	st.Close()
}

// echoStream sends back what it reads.
func echoStream(st bstream) {
	buf := make([]byte, 32<<10)
	for {
		n, err := st.Read(buf)
		if n > 0 {
			if _, werr := st.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	st.CloseWrite()
	st.Close()
}

// BenchmarkMuxBulk: one-way throughput over 1 and 8 concurrent streams
// of one connection (v2: one connection each).
func BenchmarkMuxBulk(b *testing.B) {
	for _, kind := range kindsCompared {
		for _, streams := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/streams=%d", kind, streams), func(b *testing.B) {
				open := setupKind(b, kind, sink)
				chunk := make([]byte, 256<<10)
				b.SetBytes(int64(len(chunk)))
				var next atomic.Int64
				var wg sync.WaitGroup
				errs := make(chan error, streams)
				b.ResetTimer()
				for range streams {
					wg.Add(1)
					go func() {
						defer wg.Done()
						st, err := open()
						if err != nil {
							errs <- err
							return
						}
						var sent uint64
						for next.Add(1) <= int64(b.N) {
							if _, err := st.Write(chunk); err != nil {
								errs <- err
								return
							}
							sent += uint64(len(chunk))
						}
						st.CloseWrite()
						got, err := io.ReadAll(st)
						st.Close()
						if err != nil || len(got) != 8 || binary.BigEndian.Uint64(got) != sent {
							errs <- fmt.Errorf("sink answered %x, %v; sent %d", got, err, sent)
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				close(errs)
				for err := range errs {
					b.Fatal(err)
				}
			})
		}
	}
}

// BenchmarkMuxRR: 1 KiB ping-pong on 1 and 8 concurrent streams; ns/op is
// the wall time per round trip over all streams (latency = ns/op x streams).
func BenchmarkMuxRR(b *testing.B) {
	for _, kind := range kindsCompared {
		for _, streams := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/streams=%d", kind, streams), func(b *testing.B) {
				open := setupKind(b, kind, echoStream)
				var next atomic.Int64
				var wg sync.WaitGroup
				errs := make(chan error, streams)
				sts := make([]bstream, streams)
				for i := range sts {
					st, err := open()
					if err != nil {
						b.Fatal(err)
					}
					sts[i] = st
				}
				b.ResetTimer()
				for _, st := range sts {
					wg.Add(1)
					go func() {
						defer wg.Done()
						buf := make([]byte, 1024)
						for next.Add(1) <= int64(b.N) {
							if _, err := st.Write(buf); err != nil {
								errs <- err
								return
							}
							if _, err := io.ReadFull(st, buf); err != nil {
								errs <- err
								return
							}
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				for _, st := range sts {
					st.CloseWrite()
					io.Copy(io.Discard, st)
					st.Close()
				}
				close(errs)
				for err := range errs {
					b.Fatal(err)
				}
			})
		}
	}
}

// BenchmarkMuxOpen: stream set-up rate with 8 openers: open, one byte
// each way, clean end both ways.
func BenchmarkMuxOpen(b *testing.B) {
	for _, kind := range kindsCompared {
		b.Run(kind, func(b *testing.B) {
			open := setupKind(b, kind, echoStream)
			var next atomic.Int64
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			start := time.Now()
			b.ResetTimer()
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 1)
					for next.Add(1) <= int64(b.N) {
						st, err := open()
						if err != nil {
							errs <- err
							return
						}
						if _, err := st.Write(buf); err != nil {
							errs <- err
							return
						}
						if _, err := io.ReadFull(st, buf); err != nil {
							errs <- err
							return
						}
						st.CloseWrite()
						io.Copy(io.Discard, st)
						st.Close()
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "streams/s")
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}
		})
	}
}
