package tunnel_test

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// TestDetectDeadPeer: the options reach the socket.
func TestDetectDeadPeer(t *testing.T) {
	c, _ := tunneltest.TCPPair(t)
	if err := tunnel.DetectDeadPeer(c); err != nil {
		t.Fatal(err)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var userTimeout, idle, keepalive int
	rc.Control(func(fd uintptr) {
		userTimeout, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		keepalive, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	})
	if time.Duration(userTimeout)*time.Millisecond != tunnel.DeadPeerUserTimeout {
		t.Errorf("TCP_USER_TIMEOUT = %d ms, want %v", userTimeout, tunnel.DeadPeerUserTimeout)
	}
	if keepalive != 1 || time.Duration(idle)*time.Second != tunnel.DeadPeerKeepAliveIdle {
		t.Errorf("keepalive %d, idle %d s; want on, %v", keepalive, idle, tunnel.DeadPeerKeepAliveIdle)
	}
}
