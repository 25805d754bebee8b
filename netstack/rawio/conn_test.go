package rawio

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// pair returns a raw client connection and the plain server end of a
// loopback TCP connection.
func pair(t *testing.T) (*Conn, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	rc, err := NewConn(c.(*net.TCPConn))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close(); s.Close() })
	return rc, s.(*net.TCPConn)
}

func TestConnRoundTrip(t *testing.T) {
	c, s := pair(t)
	// More than the socket buffers hold: Write must wait for writability
	// in the netpoller and still write everything.
	msg := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(s)
		got <- b
	}()
	if n, err := c.Write(msg); err != nil || n != len(msg) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if err := c.CloseWrite(); err != nil { // promoted from *net.TCPConn
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, msg) {
		t.Fatalf("server read %d bytes, want %d equal ones", len(b), len(msg))
	}

	if _, err := s.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "pong" {
		t.Fatalf("ReadAll = %q, %v; want pong then io.EOF", b, err)
	}
	if n, err := c.Read(make([]byte, 4)); n != 0 || err != io.EOF {
		t.Fatalf("Read after the end = %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := c.Read(nil); n != 0 || err != nil {
		t.Fatalf("Read of no bytes = %d, %v", n, err)
	}
}

func TestConnErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(c *Conn, s *net.TCPConn)
		op    func(c *Conn) error
		is    error
	}{
		{
			name:  "read deadline",
			setup: func(c *Conn, s *net.TCPConn) { c.SetReadDeadline(time.Now().Add(20 * time.Millisecond)) },
			op:    func(c *Conn) error { _, err := c.Read(make([]byte, 1)); return err },
			is:    os.ErrDeadlineExceeded,
		},
		{
			name:  "write deadline",
			setup: func(c *Conn, s *net.TCPConn) { c.SetWriteDeadline(time.Now().Add(20 * time.Millisecond)) },
			op: func(c *Conn) error {
				// Nobody reads the server end: the buffers fill, then the deadline.
				_, err := c.Write(make([]byte, 64<<20))
				return err
			},
			is: os.ErrDeadlineExceeded,
		},
		{
			name:  "closed",
			setup: func(c *Conn, s *net.TCPConn) { c.Close() },
			op:    func(c *Conn) error { _, err := c.Read(make([]byte, 1)); return err },
			is:    net.ErrClosed,
		},
		{
			name:  "reset by the peer",
			setup: func(c *Conn, s *net.TCPConn) { s.SetLinger(0); s.Close(); time.Sleep(20 * time.Millisecond) },
			op:    func(c *Conn) error { _, err := c.Read(make([]byte, 1)); return err },
			is:    syscall.ECONNRESET,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := pair(t)
			tt.setup(c, s)
			err := tt.op(c)
			if !errors.Is(err, tt.is) {
				t.Fatalf("error = %v, want %v", err, tt.is)
			}
			var oe *net.OpError
			if !errors.As(err, &oe) || (oe.Op != "read" && oe.Op != "write") {
				t.Fatalf("error = %#v, want a *net.OpError named read or write, as net.TCPConn's", err)
			}
			if tt.is == os.ErrDeadlineExceeded {
				var ne net.Error
				if !errors.As(err, &ne) || !ne.Timeout() {
					t.Fatalf("deadline error %v is not a net.Error timeout", err)
				}
			}
		})
	}
}

func TestConnAllocatesNothing(t *testing.T) {
	c, s := pair(t)
	buf := make([]byte, 1024)
	sb := make([]byte, 1024)
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, sb); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write(sb); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per round trip, want 0", allocs)
	}
}

// TestNewConnRefusesBlocking: a raw read on a blocking descriptor would hold
// its P until data came; NewConn refuses one.
func TestNewConnRefusesBlocking(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	rc.Control(func(fd uintptr) { serr = syscall.SetNonblock(int(fd), false) })
	if serr != nil {
		t.Fatal(serr)
	}
	if _, err := NewConn(c.(*net.TCPConn)); !errors.Is(err, ErrBlocking) {
		t.Fatalf("NewConn on a blocking fd = %v, want ErrBlocking", err)
	}
	// Wrap keeps such a connection as it is: it works, without raw calls.
	if got := Wrap(c); got != c {
		t.Fatalf("Wrap of a blocking TCP connection = %T, want the connection itself", got)
	}
}

// TestWrap: a TCP connection comes back as a Conn (TestConnRoundTrip has
// one carry bytes); another kind of connection comes back unchanged.
func TestWrap(t *testing.T) {
	_, s := pair(t)
	got := Wrap(s)
	if _, ok := got.(*Conn); !ok {
		t.Fatalf("Wrap of a TCP connection = %T, want *Conn", got)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := Wrap(a); got != a {
		t.Fatalf("Wrap of a pipe = %T, want the pipe itself", got)
	}
}

// TestConnCopy: io.Copy to and from the connection (ReadFrom, WriteTo)
// goes through Read and Write.
func TestConnCopy(t *testing.T) {
	c, s := pair(t)
	msg := bytes.Repeat([]byte("x"), 3<<20)
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(s); got <- b }()
	if n, err := io.Copy(c, bytes.NewReader(msg)); err != nil || n != int64(len(msg)) {
		t.Fatalf("io.Copy into the conn = %d, %v", n, err)
	}
	c.CloseWrite()
	if b := <-got; !bytes.Equal(b, msg) {
		t.Fatalf("peer got %d bytes, want %d", len(b), len(msg))
	}
	go func() { s.Write(msg); s.CloseWrite() }()
	var out bytes.Buffer
	if n, err := io.Copy(&out, c); err != nil || n != int64(len(msg)) {
		t.Fatalf("io.Copy from the conn = %d, %v", n, err)
	}
}

// readWithin reads what arrives at c within d.
func readWithin(c net.Conn, d time.Duration) []byte {
	c.SetReadDeadline(time.Now().Add(d))
	var got []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			return got
		}
	}
}

// TestCork: corked writes are held until Uncork (or until CorkLimit bytes
// are held, or a write alone is that large), then arrive whole and in
// order; an uncorked connection writes at once.
func TestCork(t *testing.T) {
	chunk := func(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }
	tests := []struct {
		name       string
		writes     [][]byte
		beforeSeen int // bytes the peer sees before Uncork
	}{
		{"small writes held", [][]byte{chunk(1, 100), chunk(2, 16<<10), chunk(3, 5)}, 0},
		{"past the limit flushes what was held", [][]byte{chunk(1, CorkLimit-10), chunk(2, 20)}, CorkLimit - 10},
		{"a write as large as the limit goes out at once", [][]byte{chunk(1, 10), chunk(2, CorkLimit)}, 10 + CorkLimit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := pair(t)
			var want []byte
			c.Cork()
			for _, w := range tt.writes {
				if n, err := c.Write(w); err != nil || n != len(w) {
					t.Fatalf("corked Write = %d, %v", n, err)
				}
				want = append(want, w...)
			}
			// What went out before Uncork arrives (however slowly a
			// loaded machine delivers it), and nothing more does.
			before := make([]byte, tt.beforeSeen)
			s.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(s, before); err != nil || !bytes.Equal(before, want[:len(before)]) {
				t.Fatalf("before Uncork: %v; the peer did not get the first %d bytes", err, tt.beforeSeen)
			}
			if extra := readWithin(s, 100*time.Millisecond); len(extra) != 0 {
				t.Fatalf("before Uncork the peer got %d held bytes too", len(extra))
			}
			if err := c.Uncork(); err != nil {
				t.Fatal(err)
			}
			s.SetReadDeadline(time.Now().Add(5 * time.Second))
			after := make([]byte, len(want)-len(before))
			if _, err := io.ReadFull(s, after); err != nil || !bytes.Equal(append(before, after...), want) {
				t.Fatalf("after Uncork: %v; the peer did not get the %d bytes in order", err, len(want))
			}
			// Uncorked again: a write goes out at once.
			c.Write([]byte("now"))
			got := make([]byte, 3)
			s.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(s, got); err != nil || string(got) != "now" {
				t.Fatalf("after Uncork the peer got %q, %v; want the write without an Uncork", got, err)
			}
		})
	}
}

// TestCorkFailedFlushSticks: a flush that fails (the peer reset the
// connection) is Uncork's error, and every later Write fails too: the
// bytes reported written while corked were lost.
func TestCorkFailedFlushSticks(t *testing.T) {
	c, s := pair(t)
	s.SetLinger(0)
	s.Close()
	time.Sleep(20 * time.Millisecond)
	c.Cork()
	if _, err := c.Write([]byte("held")); err != nil {
		t.Fatalf("corked Write = %v, want it held", err)
	}
	var err error
	for range 100 { // the first write after a reset may still succeed
		if err = c.Uncork(); err != nil {
			break
		}
		c.Cork()
		c.Write([]byte("more"))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("Uncork never reported the reset connection")
	}
	if _, werr := c.Write([]byte("x")); werr == nil {
		t.Fatal("Write after a failed flush succeeded")
	}
}
