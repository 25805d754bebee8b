package rawio

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// pipe returns a non-blocking pipe, closed at the end of the test.
func pipe(t *testing.T) (r, w int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0], p[1]
}

func TestWritevRead(t *testing.T) {
	r, w := pipe(t)
	var iov []unix.Iovec
	tests := []struct {
		name string
		bufs [][]byte
		want string
	}{
		{"one", [][]byte{[]byte("abc")}, "abc"},
		{"several with empty ones", [][]byte{nil, []byte("he"), {}, []byte("llo")}, "hello"},
		{"only empty", [][]byte{{}, nil}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var n int
			var err error
			n, iov, err = Writev(uintptr(w), tt.bufs, iov)
			if err != nil || n != len(tt.want) {
				t.Fatalf("Writev = %d, %v; want %d, nil", n, err, len(tt.want))
			}
			for _, v := range iov[:cap(iov)] {
				if v.Base != nil {
					t.Fatal("Writev kept a reference to a buffer in its scratch iovecs")
				}
			}
			if tt.want == "" {
				return
			}
			got := make([]byte, 64)
			n, err = Read(uintptr(r), got)
			if err != nil || string(got[:n]) != tt.want {
				t.Fatalf("Read = %q, %v; want %q", got[:n], err, tt.want)
			}
		})
	}
}

func TestEAGAIN(t *testing.T) {
	r, w := pipe(t)
	if _, err := Read(uintptr(r), make([]byte, 8)); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("Read of an empty non-blocking pipe = %v, want EAGAIN", err)
	}
	big := bytes.Repeat([]byte{1}, 1<<20)
	total := 0
	for {
		n, err := Write(uintptr(w), big)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if total == 0 {
		t.Fatal("no byte written before the pipe was full")
	}
	if _, _, err := Writev(uintptr(w), [][]byte{big}, nil); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("Writev to a full pipe = %v, want EAGAIN", err)
	}
}

func TestErrors(t *testing.T) {
	if _, err := Read(^uintptr(0)>>1, make([]byte, 1)); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Read of a bad fd = %v, want EBADF", err)
	}
	if _, err := Write(^uintptr(0)>>1, []byte{1}); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Write to a bad fd = %v, want EBADF", err)
	}
}
