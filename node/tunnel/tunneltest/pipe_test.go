package tunneltest_test

import (
	"errors"
	"io"
	"net"
	"testing"

	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

func TestPipeHalfClose(t *testing.T) {
	a, b := tunneltest.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		a.Write([]byte("ping"))
		a.CloseWrite()
	}()
	got, err := io.ReadAll(b)
	if err != nil || string(got) != "ping" {
		t.Fatalf("b read %q, %v; want ping then EOF", got, err)
	}
	// The other direction still works after a's CloseWrite.
	go func() {
		b.Write([]byte("pong"))
		b.Close()
	}()
	got, err = io.ReadAll(a)
	if err != nil || string(got) != "pong" {
		t.Fatalf("a read %q, %v; want pong then EOF", got, err)
	}
	a.Close()
	if _, err := a.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v, want net.ErrClosed", err)
	}
	if _, err := a.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after Close: %v, want net.ErrClosed", err)
	}
}

func TestTLSPair(t *testing.T) {
	c, s := tunneltest.TLSPair(t)
	go func() {
		c.Write([]byte("hi"))
		c.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hi" {
		t.Fatalf("server read %q, %v", got, err)
	}
	if len(s.ConnectionState().PeerCertificates) == 0 {
		t.Error("server saw no client certificate")
	}
}
