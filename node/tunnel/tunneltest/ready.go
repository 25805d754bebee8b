package tunneltest

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrWouldBlock is ReadyConn.TryRead's answer when nothing is buffered.
// Like netstack.ErrWouldBlock it has WouldBlock() bool, which is how
// tunnel.Readable recognizes it.
var ErrWouldBlock error = wouldBlockError{}

type wouldBlockError struct{}

func (wouldBlockError) Error() string    { return "tunneltest: no data buffered" }
func (wouldBlockError) WouldBlock() bool { return true }

// ReadyConn is the agent's end of ReadyPipe: a pod's connection as the
// agent's netstack offers it (tunnel.Readable: NotifyReadable, TryRead),
// with CloseWrite and Abort. The pod's bytes wait in a buffer until read,
// so the pod's writes never wait for the agent; the readable callbacks
// run on the pod writer's goroutine, as gVisor runs them on its TCP
// processor, so a callback that blocks blocks the pod's Write (a test can
// see it).
type ReadyConn struct {
	toPod net.Conn // write end of the pipe to the pod

	mu     sync.Mutex // guards the fields below
	buf    []byte     // the pod's bytes not read yet
	eof    bool       // the pod ended its direction (a FIN)
	rerr   error      // the pod reset the connection
	closed bool

	watchMu   sync.RWMutex // held for reading while callbacks run
	watchers  map[int]func()
	nextWatch int
	readable  chan struct{} // for the blocking Read

	aborted  atomic.Bool
	notified atomic.Int64
}

// ReadyPod is the pod's end of ReadyPipe.
type ReadyPod struct {
	c      *ReadyConn
	fromAg net.Conn // read end of the pipe from the agent
}

// ReadyPipe returns a connected agent end (readable on demand) and pod
// end. The agent-to-pod direction is a synchronous pipe (a pod that does
// not read stalls the agent's Write).
func ReadyPipe() (*ReadyConn, *ReadyPod) {
	w, r := net.Pipe()
	c := &ReadyConn{toPod: w, watchers: make(map[int]func()), readable: make(chan struct{}, 1)}
	return c, &ReadyPod{c: c, fromAg: r}
}

// NotifyReadable registers f (see tunnel.Readable).
func (c *ReadyConn) NotifyReadable(f func()) (cancel func()) {
	c.watchMu.Lock()
	id := c.nextWatch
	c.nextWatch++
	c.watchers[id] = f
	c.watchMu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			c.watchMu.Lock()
			delete(c.watchers, id)
			c.watchMu.Unlock()
		})
	}
}

// Watchers is how many callbacks are registered.
func (c *ReadyConn) Watchers() int {
	c.watchMu.RLock()
	defer c.watchMu.RUnlock()
	return len(c.watchers)
}

// Notified is how many times the callbacks were called.
func (c *ReadyConn) Notified() int64 { return c.notified.Load() }

func (c *ReadyConn) notify() {
	select {
	case c.readable <- struct{}{}:
	default:
	}
	c.watchMu.RLock()
	defer c.watchMu.RUnlock()
	for _, f := range c.watchers {
		c.notified.Add(1)
		f()
	}
}

// TryRead reads what the pod sent, without waiting: ErrWouldBlock when
// nothing is buffered, io.EOF after the pod's CloseWrite, an ECONNRESET
// error after its Reset.
func (c *ReadyConn) TryRead(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tryReadLocked(b)
}

func (c *ReadyConn) tryReadLocked(b []byte) (int, error) {
	switch {
	case c.closed:
		return 0, net.ErrClosed
	case len(c.buf) > 0:
		n := copy(b, c.buf)
		c.buf = c.buf[n:]
		if len(c.buf) == 0 {
			c.buf = nil
		}
		return n, nil
	case c.rerr != nil:
		return 0, c.rerr
	case c.eof:
		return 0, io.EOF
	}
	return 0, ErrWouldBlock
}

// ReadReady reports whether TryRead would return something other than
// ErrWouldBlock (as netstack.Conn.ReadReady).
func (c *ReadyConn) ReadReady() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed || len(c.buf) > 0 || c.rerr != nil || c.eof
}

// Read waits for the pod's bytes (the path of a splice that does not use
// readiness).
func (c *ReadyConn) Read(b []byte) (int, error) {
	for {
		c.mu.Lock()
		n, err := c.tryReadLocked(b)
		c.mu.Unlock()
		if err != ErrWouldBlock {
			return n, err
		}
		<-c.readable
	}
}

// Write sends b to the pod; it waits until the pod reads it.
func (c *ReadyConn) Write(b []byte) (int, error) { return c.toPod.Write(b) }

// CloseWrite ends the direction towards the pod (the pod reads io.EOF).
func (c *ReadyConn) CloseWrite() error { return c.toPod.Close() }

// Close closes the agent's end: later reads fail with net.ErrClosed and
// the pod's Read gets io.EOF (use Aborted to tell an abort).
func (c *ReadyConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.buf = nil
	c.mu.Unlock()
	c.toPod.Close()
	c.notify() // as gVisor: a close is an event
	return nil
}

// Abort is Close that the pod would see as a reset.
func (c *ReadyConn) Abort() {
	c.aborted.Store(true)
	c.Close()
}

// Aborted reports whether the agent's end was aborted (vs closed).
func (c *ReadyConn) Aborted() bool { return c.aborted.Load() }

// Closed reports whether the agent's end was closed (or aborted).
func (c *ReadyConn) Closed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *ReadyConn) LocalAddr() net.Addr                { return c.toPod.LocalAddr() }
func (c *ReadyConn) RemoteAddr() net.Addr               { return c.toPod.RemoteAddr() }
func (c *ReadyConn) SetDeadline(t time.Time) error      { return c.toPod.SetWriteDeadline(t) }
func (c *ReadyConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *ReadyConn) SetWriteDeadline(t time.Time) error { return c.toPod.SetWriteDeadline(t) }

// Write queues b for the agent and runs its readable callbacks before it
// returns, on this goroutine.
func (p *ReadyPod) Write(b []byte) (int, error) {
	c := p.c
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, syscall.EPIPE
	}
	if c.eof || c.rerr != nil {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	c.buf = append(c.buf, b...)
	c.mu.Unlock()
	c.notify()
	return len(b), nil
}

// CloseWrite ends the pod's direction cleanly (a FIN).
func (p *ReadyPod) CloseWrite() error {
	c := p.c
	c.mu.Lock()
	c.eof = true
	c.mu.Unlock()
	c.notify()
	return nil
}

// Reset cuts the connection from the pod's side (a RST): the agent's
// TryRead fails once the bytes before it are read.
func (p *ReadyPod) Reset() {
	c := p.c
	c.mu.Lock()
	if c.rerr == nil {
		c.rerr = errors.New("tunneltest: connection reset by pod: " + syscall.ECONNRESET.Error())
	}
	c.mu.Unlock()
	p.fromAg.Close()
	c.notify()
}

// Read reads what the agent wrote.
func (p *ReadyPod) Read(b []byte) (int, error) { return p.fromAg.Read(b) }

// Close ends the pod's direction and stops reading.
func (p *ReadyPod) Close() error {
	p.CloseWrite()
	return p.fromAg.Close()
}
