package flowlog

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/tunmesh/tunmesh/node/httpsniff"
)

// Observe returns conn wrapped so that the HTTP/1 exchanges on it are
// reported (tap events, HTTP metrics), or conn itself when nobody wants
// them (no HTTP metrics and no tap when the connection opened): then the
// parser costs nothing. clientReads says that conn's reads are the
// client's bytes (outbound: conn is the client pod's connection).
//
// The wrapper keeps what the splice and the tunnel look for on a pod's
// connection: CloseWrite, Abort, SetLinger and, when conn has it,
// TryWrite.
func (t *Track) Observe(conn net.Conn, clientReads bool) net.Conn {
	l := t.l
	if !l.opts.HTTP && !l.tapping() {
		return conn
	}
	o := &observed{Conn: conn, clientReads: clientReads}
	o.p = httpsniff.New(httpsniff.Callbacks{
		Request: func(r httpsniff.Request) {
			l.publish(Event{Type: "req", Time: r.Start, Conn: t.snapshot(), Method: r.Method, Authority: r.Authority, Path: r.Path})
		},
		Response: func(r httpsniff.Response) {
			c := t.snapshot()
			l.metrics.response(t.lbl, r.Status, r.Latency)
			l.publish(Event{Type: "rsp", Time: r.Request.Start.Add(r.Latency), Conn: c, Status: r.Status, Latency: r.Latency,
				Method: r.Request.Method, Authority: r.Request.Authority, Path: r.Request.Path})
		},
		End: func(e httpsniff.End) {
			l.publish(Event{Type: "end", Time: e.Response.Request.Start.Add(e.Duration), Conn: t.snapshot(), Status: e.Response.Status,
				Duration: e.Duration, ResponseLength: e.ResponseLength})
		},
	}, nil)
	t.obs = o
	if tw, ok := conn.(tryWriter); ok {
		if rd, ok := conn.(readable); ok {
			return &observedReady{observedTry: &observedTry{observed: o, tw: tw}, rd: rd}
		}
		return &observedTry{observed: o, tw: tw}
	}
	return o
}

// readable is a connection read on demand (tunnel.Readable,
// netstack.Conn): the splice then parks no goroutine in Read.
type readable interface {
	NotifyReadable(f func()) (cancel func())
	TryRead(p []byte) (int, error)
}

// observedReady keeps readiness visible through the observer.
type observedReady struct {
	*observedTry
	rd readable
}

func (o *observedReady) NotifyReadable(f func()) (cancel func()) { return o.rd.NotifyReadable(f) }

// ReadReady forwards the connection's (netstack.Conn.ReadReady): a splice
// starts no copy for a direction that has nothing yet. A connection that
// cannot tell says true, and the splice looks.
func (o *observedReady) ReadReady() bool {
	if p, ok := o.rd.(interface{ ReadReady() bool }); ok {
		return p.ReadReady()
	}
	return true
}

// TryRead shows what it read to the parser, as Read does.
func (o *observedReady) TryRead(b []byte) (int, error) {
	n, err := o.rd.TryRead(b)
	o.feed(o.clientReads, b[:n])
	return n, err
}

// snapshot is the connection's record as opened (no lock: HTTP events
// are on the data path).
func (t *Track) snapshot() Conn { return t.base }

type tryWriter interface {
	TryWrite(p []byte) (int, error)
}

// observed feeds a connection's bytes to an HTTP parser. The parser is
// called under mu (reads and writes run on different goroutines); once it
// has given up, dead short-cuts every call.
type observed struct {
	net.Conn
	clientReads bool
	dead        atomic.Bool
	mu          sync.Mutex // guards p
	p           *httpsniff.Parser
}

func (o *observed) feed(fromClient bool, b []byte) {
	if len(b) == 0 || o.dead.Load() {
		return
	}
	o.mu.Lock()
	o.feedLocked(fromClient, b)
	o.mu.Unlock()
}

func (o *observed) feedLocked(fromClient bool, b []byte) {
	if fromClient {
		o.p.Client(b)
	} else {
		o.p.Server(b)
	}
	if !o.p.Active() {
		o.dead.Store(true)
	}
}

func (o *observed) close() {
	if o.dead.Load() {
		return
	}
	o.mu.Lock()
	o.p.Close()
	o.dead.Store(true)
	o.mu.Unlock()
}

func (o *observed) Read(b []byte) (int, error) {
	n, err := o.Conn.Read(b)
	o.feed(o.clientReads, b[:n])
	return n, err
}

// Write shows b to the parser first: once written, the peer may answer
// and the answer be read (and parsed) before a blocking Write returns.
func (o *observed) Write(b []byte) (int, error) {
	o.feed(!o.clientReads, b)
	return o.Conn.Write(b)
}

// CloseWrite half-closes the wrapped connection. One that cannot
// half-close reports errors.ErrUnsupported, as if the wrapper had no
// CloseWrite (the splice then ends both directions cleanly), never a full
// Close: that would fail the other direction's reads with net.ErrClosed,
// which the splice takes for a cut.
func (o *observed) CloseWrite() error {
	if cw, ok := o.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("flowlog: half-close: %w", errors.ErrUnsupported)
}

func (o *observed) Abort() {
	if a, ok := o.Conn.(interface{ Abort() }); ok {
		a.Abort()
		return
	}
	o.Conn.Close()
}

func (o *observed) SetLinger(sec int) error {
	if l, ok := o.Conn.(interface{ SetLinger(int) error }); ok {
		return l.SetLinger(sec)
	}
	return nil
}

// NetConn returns the wrapped connection.
func (o *observed) NetConn() net.Conn { return o.Conn }

type observedTry struct {
	*observed
	tw tryWriter
}

// TryWrite never blocks: the parser's lock is held across it, so that an
// answer to these bytes is parsed after them.
func (o *observedTry) TryWrite(b []byte) (int, error) {
	if o.dead.Load() {
		return o.tw.TryWrite(b)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	n, err := o.tw.TryWrite(b)
	if n > 0 && !o.dead.Load() {
		o.feedLocked(!o.clientReads, b[:n])
	}
	return n, err
}
