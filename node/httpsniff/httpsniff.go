// Package httpsniff is a passive HTTP/1 parser for tap and metrics: it
// reads copies of the bytes of one TCP connection, client to server and
// server to client, and reports each request (method, authority, path),
// its response (status, latency) and the response's end (duration, body
// length). It never changes or holds bytes: the connection's data moves
// whatever the parser thinks of it.
//
// It gives up for good (Active reports false, every later call returns at
// once) on the first sign that the stream is not HTTP/1: a first line that
// is not a request, headers past MaxHeaderBytes, a framing it cannot follow,
// or a protocol switch (101, CONNECT). A connection that is not HTTP costs
// one look at its first bytes.
package httpsniff

import (
	"bytes"
	"strconv"
	"time"
)

// MaxHeaderBytes bounds a request's or response's header block.
const MaxHeaderBytes = 16 << 10

// maxPipelined bounds requests awaiting their response.
const maxPipelined = 64

// Request is a parsed request head.
type Request struct {
	Method, Authority, Path string
	Start                   time.Time
}

// Response is a parsed response head for a request.
type Response struct {
	Request Request
	Status  int
	Latency time.Duration // request start to response head
}

// End is a finished response.
type End struct {
	Response       Response
	Duration       time.Duration // request start to the last body byte
	ResponseLength int64         // body bytes (after chunked framing)
}

// Callbacks receive the parser's events; nil ones are skipped. They run on
// the caller's goroutine (the data path) and must not block.
type Callbacks struct {
	Request  func(Request)
	Response func(Response)
	End      func(End)
}

// Parser follows one connection. Client and Server may be called from
// different goroutines only if the caller serializes them (the conn
// wrapper in flowlog does).
type Parser struct {
	cb   Callbacks
	now  func() time.Time
	dead bool

	req  side
	resp side
	// pending requests, oldest first, waiting for their response.
	pending []Request
	// cur is the request whose response is being read.
	cur      Response
	bodyLen  int64
	headOnly bool
}

// New returns a parser reporting to cb. now is the clock (nil: time.Now).
func New(cb Callbacks, now func() time.Time) *Parser {
	if now == nil {
		now = time.Now
	}
	return &Parser{cb: cb, now: now}
}

// Active reports whether the parser still follows the stream.
func (p *Parser) Active() bool { return !p.dead }

func (p *Parser) fail() {
	p.dead = true
	p.req.head, p.resp.head = nil, nil
	p.pending = nil
}

// side is one direction's framing state.
type side struct {
	state  int // stHead, stFixed, stChunkSize, stChunkData, stChunkCRLF, stTrailer, stUntilClose
	head   []byte
	remain int64
	line   []byte // chunk-size or trailer line
	// prefix holds this direction's first bytes until they show whether
	// the stream is HTTP/1 (confirmed) or not (the parser gives up).
	prefix    []byte
	confirmed bool
}

// check looks at a direction's first bytes: ok is false when they cannot
// start an HTTP/1 message, done once enough were seen to tell.
func (s *side) check(b []byte, client bool) (ok bool) {
	need := 8 // longest method with its space ("OPTIONS ", "CONNECT ")
	if !client {
		need = 5 // "HTTP/"
	}
	s.prefix = append(s.prefix, b[:min(len(b), need-len(s.prefix))]...)
	if client {
		if !looksLikeRequest(s.prefix) {
			return false
		}
		for _, m := range methods {
			if len(s.prefix) >= len(m) && string(s.prefix[:len(m)]) == string(m) {
				s.confirmed = true
			}
		}
	} else if string(s.prefix) != "HTTP/"[:len(s.prefix)] {
		return false
	}
	if len(s.prefix) >= need {
		s.confirmed = true
	}
	if s.confirmed {
		s.prefix = nil
	}
	return true
}

const (
	stHead = iota
	stFixed
	stChunkSize
	stChunkData
	stChunkCRLF
	stTrailer
	stUntilClose
)

var methods = [][]byte{[]byte("GET "), []byte("POST "), []byte("PUT "), []byte("HEAD "), []byte("DELETE "),
	[]byte("OPTIONS "), []byte("PATCH "), []byte("TRACE "), []byte("CONNECT ")}

// looksLikeRequest: could b (the stream's first bytes) start a request?
func looksLikeRequest(b []byte) bool {
	for _, m := range methods {
		n := min(len(b), len(m))
		if bytes.Equal(b[:n], m[:n]) {
			return true
		}
	}
	return false
}

// Client feeds bytes the client sent.
func (p *Parser) Client(b []byte) {
	if p.dead || len(b) == 0 {
		return
	}
	if !p.req.confirmed && !p.req.check(b, true) {
		p.fail()
		return
	}
	for len(b) > 0 && !p.dead {
		b = p.feed(&p.req, b, true)
	}
}

// Server feeds bytes the server sent.
func (p *Parser) Server(b []byte) {
	if p.dead || len(b) == 0 {
		return
	}
	if !p.resp.confirmed && !p.resp.check(b, false) {
		p.fail()
		return
	}
	for len(b) > 0 && !p.dead {
		b = p.feed(&p.resp, b, false)
	}
}

// Close reports the end of a response read until the connection closed.
func (p *Parser) Close() {
	if p.dead {
		return
	}
	if p.resp.state == stUntilClose {
		p.endResponse()
	}
	p.dead = true
}

// feed consumes a prefix of b in s's current state and returns the rest.
func (p *Parser) feed(s *side, b []byte, client bool) []byte {
	switch s.state {
	case stHead:
		i := bytes.Index(b, []byte("\n"))
		// Collect up to the end of the header block.
		for {
			if i < 0 {
				s.head = append(s.head, b...)
				if len(s.head) > MaxHeaderBytes {
					p.fail()
				}
				return nil
			}
			s.head = append(s.head, b[:i+1]...)
			b = b[i+1:]
			if len(s.head) > MaxHeaderBytes {
				p.fail()
				return nil
			}
			if bytes.HasSuffix(s.head, []byte("\n\r\n")) || bytes.HasSuffix(s.head, []byte("\n\n")) {
				break
			}
			if len(s.head) <= 2 && (string(s.head) == "\r\n" || string(s.head) == "\n") {
				s.head = s.head[:0] // tolerated empty lines between messages
			}
			i = bytes.Index(b, []byte("\n"))
		}
		head := s.head
		s.head = s.head[:0]
		if client {
			p.requestHead(head)
		} else {
			p.responseHead(head)
		}
		return b
	case stFixed:
		n := min(int64(len(b)), s.remain)
		s.remain -= n
		if !client {
			p.bodyLen += n
		}
		if s.remain == 0 {
			p.bodyDone(s, client)
		}
		return b[n:]
	case stUntilClose:
		if !client {
			p.bodyLen += int64(len(b))
		}
		return nil
	case stChunkSize, stTrailer:
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			s.line = append(s.line, b...)
			if len(s.line) > 4096 {
				p.fail()
			}
			return nil
		}
		line := append(s.line, b[:i]...)
		s.line = s.line[:0]
		b = b[i+1:]
		line = bytes.TrimRight(line, "\r")
		if s.state == stTrailer {
			if len(line) == 0 {
				p.bodyDone(s, client)
			}
			return b
		}
		if j := bytes.IndexByte(line, ';'); j >= 0 {
			line = line[:j]
		}
		size, err := strconv.ParseInt(string(bytes.TrimSpace(line)), 16, 64)
		if err != nil || size < 0 {
			p.fail()
			return nil
		}
		if size == 0 {
			s.state = stTrailer
			return b
		}
		s.state, s.remain = stChunkData, size
		return b
	case stChunkData:
		n := min(int64(len(b)), s.remain)
		s.remain -= n
		if !client {
			p.bodyLen += n
		}
		if s.remain == 0 {
			s.state, s.remain = stChunkCRLF, 2
		}
		return b[n:]
	case stChunkCRLF:
		// "\r\n" after a chunk's data (a bare "\n" is tolerated).
		for len(b) > 0 && s.remain > 0 {
			c := b[0]
			b = b[1:]
			if c == '\n' {
				s.remain = 0
				break
			}
			if c != '\r' {
				p.fail()
				return nil
			}
			s.remain--
		}
		if s.remain == 0 {
			s.state = stChunkSize
		}
		return b
	}
	p.fail()
	return nil
}

// headers parses a header block into its first line and a lookup.
func headers(head []byte) (first []byte, get func(name string) ([]byte, bool)) {
	lines := bytes.Split(bytes.TrimRight(head, "\r\n"), []byte("\n"))
	first = bytes.TrimRight(lines[0], "\r")
	rest := lines[1:]
	return first, func(name string) ([]byte, bool) {
		var found []byte
		ok := false
		for _, l := range rest {
			k, v, has := bytes.Cut(bytes.TrimRight(l, "\r"), []byte(":"))
			if has && bytes.EqualFold(bytes.TrimSpace(k), []byte(name)) {
				found, ok = bytes.TrimSpace(v), true
			}
		}
		return found, ok
	}
}

// framing returns how a message's body is delimited.
func framing(get func(string) ([]byte, bool)) (chunked bool, length int64, hasLength, bad bool) {
	if te, ok := get("Transfer-Encoding"); ok {
		if bytes.EqualFold(bytes.TrimSpace(te[max(0, bytes.LastIndexByte(te, ',')+1):]), []byte("chunked")) {
			return true, 0, false, false
		}
		return false, 0, false, true // a framing we do not follow
	}
	if cl, ok := get("Content-Length"); ok {
		n, err := strconv.ParseInt(string(cl), 10, 64)
		if err != nil || n < 0 {
			return false, 0, false, true
		}
		return false, n, true, false
	}
	return false, 0, false, false
}

func (p *Parser) requestHead(head []byte) {
	first, get := headers(head)
	parts := bytes.Fields(first)
	if len(parts) != 3 || !bytes.HasPrefix(parts[2], []byte("HTTP/1.")) {
		p.fail()
		return
	}
	r := Request{Method: string(parts[0]), Path: string(parts[1]), Start: p.now()}
	if h, ok := get("Host"); ok {
		r.Authority = string(h)
	}
	if r.Method == "CONNECT" || len(p.pending) >= maxPipelined {
		p.fail()
		return
	}
	chunked, n, _, bad := framing(get)
	if bad {
		p.fail()
		return
	}
	p.pending = append(p.pending, r)
	if p.cb.Request != nil {
		p.cb.Request(r)
	}
	switch {
	case chunked:
		p.req.state = stChunkSize
	case n > 0:
		p.req.state, p.req.remain = stFixed, n
	default:
		p.req.state = stHead
	}
}

func (p *Parser) responseHead(head []byte) {
	first, get := headers(head)
	parts := bytes.Fields(first)
	if len(parts) < 2 || !bytes.HasPrefix(parts[0], []byte("HTTP/1.")) || len(parts[1]) != 3 {
		p.fail()
		return
	}
	status, err := strconv.Atoi(string(parts[1]))
	if err != nil || status < 100 || status > 999 {
		p.fail()
		return
	}
	if status == 101 {
		p.fail() // a protocol switch: what follows is not HTTP/1
		return
	}
	if status < 200 {
		return // an interim response (100 Continue): the real one follows
	}
	if len(p.pending) == 0 {
		p.fail() // a response to nothing: we lost track
		return
	}
	req := p.pending[0]
	p.pending = p.pending[1:]
	now := p.now()
	p.cur = Response{Request: req, Status: status, Latency: now.Sub(req.Start)}
	p.bodyLen = 0
	if p.cb.Response != nil {
		p.cb.Response(p.cur)
	}
	if req.Method == "HEAD" || status == 204 || status == 304 {
		p.endResponse()
		return
	}
	chunked, n, hasLength, bad := framing(get)
	switch {
	case bad:
		p.fail()
	case chunked:
		p.resp.state = stChunkSize
	case hasLength && n == 0:
		p.endResponse()
	case hasLength:
		p.resp.state, p.resp.remain = stFixed, n
	default:
		p.resp.state = stUntilClose
	}
}

// bodyDone: a message body ended; the side waits for the next head.
func (p *Parser) bodyDone(s *side, client bool) {
	s.state = stHead
	if !client {
		p.endResponse()
	}
}

func (p *Parser) endResponse() {
	p.resp.state = stHead
	if p.cb.End != nil {
		p.cb.End(End{Response: p.cur, Duration: p.now().Sub(p.cur.Request.Start), ResponseLength: p.bodyLen})
	}
}
