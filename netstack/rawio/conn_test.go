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
