package capture

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestPacketSocketFilteredFromTheStart (root): a packet socket whose
// filter passes nothing never holds a packet, even while loopback is
// flooded as it opens: nothing is queued before the filter is attached.
func TestPacketSocketFilteredFromTheStart(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (AF_PACKET)")
	}
	ln, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	flooded := make(chan struct{})
	go func() { // floods loopback until cancel
		defer close(flooded)
		c, err := net.Dial("udp4", ln.LocalAddr().String())
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 64)
		for ctx.Err() == nil {
			_, _ = c.Write(b)
		}
	}()
	t.Cleanup(func() { cancel(); <-flooded })
	go func() { // drains the receiver
		b := make([]byte, 64)
		for {
			if _, _, err := ln.ReadFrom(b); err != nil {
				return
			}
		}
	}()
	nothing := []bpf.Instruction{bpf.RetConstant{Val: 0}}
	buf := make([]byte, 2048)
	for i := 0; i < 100; i++ {
		fd, err := packetSocketHere("lo", nothing)
		if err != nil {
			t.Fatal(err)
		}
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		unix.Close(fd)
		if !errors.Is(err, unix.EAGAIN) {
			t.Fatalf("attempt %d: the socket held a packet (%d bytes, err %v) its filter refuses", i, n, err)
		}
	}
}
