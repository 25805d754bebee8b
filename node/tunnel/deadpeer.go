package tunnel

import (
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Dead-peer detection on tunnel connections. A pooled connection outlives
// any one pod connection, so a peer node that vanishes without a word
// (powered off, partitioned) must be noticed by the kernel rather than by
// every new stream in turn waiting for its reply: keepalives find it while
// the connection is idle, and the user timeout once bytes sent to it stay
// unacknowledged (Linux TCP_USER_TIMEOUT), which without it could take
// the retransmission limit's ~15 minutes.
const (
	DeadPeerKeepAliveIdle     = 15 * time.Second
	DeadPeerKeepAliveInterval = 5 * time.Second
	DeadPeerKeepAliveCount    = 3
	DeadPeerUserTimeout       = 20 * time.Second
)

// DeadPeerKeepAlive is the keepalive configuration of tunnel connections.
var DeadPeerKeepAlive = net.KeepAliveConfig{
	Enable: true, Idle: DeadPeerKeepAliveIdle, Interval: DeadPeerKeepAliveInterval, Count: DeadPeerKeepAliveCount,
}

// DetectDeadPeer sets the keepalives and the user timeout on a tunnel's
// TCP connection.
func DetectDeadPeer(c *net.TCPConn) error {
	if err := c.SetKeepAliveConfig(DeadPeerKeepAlive); err != nil {
		return fmt.Errorf("set tunnel keepalive: %w", err)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("set tunnel user timeout: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(DeadPeerUserTimeout/time.Millisecond))
	}); err != nil {
		return fmt.Errorf("set tunnel user timeout: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("set tunnel user timeout: %w", serr)
	}
	return nil
}
