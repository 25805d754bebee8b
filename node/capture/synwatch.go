package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/gopacket/gopacket/layers"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// WatchSYNs reports the TCP SYNs (without ACK) that leave an Ethernet
// interface of the agent's network namespace (the node's: a bridge, a
// pod's veth, the underlay), until stop is called. A connection opened
// toward one of the node's pods from outside the mesh (a kubelet probe from
// the node, a plaintext peer) crosses the node's namespace on its way to
// the pod's eth0; a meshed one never does (it reaches the pod through tm0).
// An in-kernel filter lets nothing but SYNs through, so the watch costs a
// few instructions per packet and one parked goroutine. A SYN may be seen
// more than once (routed out a bridge, then out the pod's veth): callers
// dedupe.
func WatchSYNs(report func(src, dst netip.AddrPort)) (stop func(), err error) {
	fd, err := packetSocketHere("", synFilter())
	if err != nil {
		return nil, err
	}
	tv := unix.NsecToTimeval(int64(250 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("syn socket timeout: %w", err)
	}
	stopc, done := make(chan struct{}), make(chan struct{})
	go func() { // RoutineWatchSYNs: ends at stop
		defer close(done)
		buf := make([]byte, 256) // headers only: the filter truncates
		for {
			select {
			case <-stopc:
				return
			default:
			}
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				return
			}
			ll, ok := from.(*unix.SockaddrLinklayer)
			if !ok || ll.Hatype != unix.ARPHRD_ETHER || ll.Pkttype != unix.PACKET_OUTGOING {
				continue
			}
			if _, src, dst, ok := Ports(buf[:n], layers.LinkTypeEthernet); ok {
				report(src, dst)
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stopc)
			<-done
			unix.Close(fd)
		})
	}, nil
}

// synFilter keeps TCP segments with SYN and without ACK, IPv4 (not
// fragments) and IPv6 (no extension headers) over Ethernet, truncated to
// 128 bytes.
func synFilter() []bpf.Instruction {
	return []bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 12, Size: 2},
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x0800, SkipFalse: 8},
		/* 2 */ bpf.LoadAbsolute{Off: 23, Size: 1},
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 13},
		/* 4 */ bpf.LoadAbsolute{Off: 20, Size: 2},
		/* 5 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x1fff, SkipTrue: 11},
		/* 6 */ bpf.LoadMemShift{Off: 14},
		/* 7 */ bpf.LoadIndirect{Off: 27, Size: 1}, // TCP flags
		/* 8 */ bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: 0x12},
		/* 9 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x02, SkipTrue: 6, SkipFalse: 7},
		/* 10 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x86dd, SkipFalse: 6}, // A: EtherType
		/* 11 */ bpf.LoadAbsolute{Off: 20, Size: 1},
		/* 12 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 4},
		/* 13 */ bpf.LoadAbsolute{Off: 67, Size: 1},
		/* 14 */ bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: 0x12},
		/* 15 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x02, SkipFalse: 1},
		/* 16 */ bpf.RetConstant{Val: 128},
		/* 17 */ bpf.RetConstant{Val: 0},
	}
}
