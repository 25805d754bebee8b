package capture

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netns"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// PacketSocket is a Source reading an AF_PACKET socket: in the network
// namespace at netnsPath ("" for the agent's own), bound to ifname (""
// for every interface), with an in-kernel filter for TCP port filterPort
// when non-zero (the wire side keeps only the mesh port). outIsOutgoing:
// an outgoing packet counts as "out" (wire side: leaves the node); else
// an incoming one does (pod side: toward the pod).
func PacketSocket(name, netnsPath, ifname string, filterPort uint16, outIsOutgoing bool) Source {
	return Source{Name: name, LinkType: layers.LinkTypeEthernet, Start: func(emit func([]byte, bool)) (func(), error) {
		var filter []bpf.Instruction
		if filterPort != 0 {
			filter = portFilter(filterPort)
		}
		fd, err := openPacketSocket(netnsPath, ifname, filter)
		if err != nil {
			return nil, err
		}
		tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("packet socket timeout: %w", err)
		}
		r := &sockReader{fd: fd, stop: make(chan struct{}), done: make(chan struct{})}
		go r.routineRead(emit, outIsOutgoing)
		return r.close, nil
	}}
}

type sockReader struct {
	fd   int
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// close stops the reader (within the socket's receive timeout), waits for
// it, and closes the socket.
func (r *sockReader) close() {
	r.once.Do(func() {
		close(r.stop)
		<-r.done
		unix.Close(r.fd)
	})
}

// routineRead reads packets until stopped.
func (r *sockReader) routineRead(emit func([]byte, bool), outIsOutgoing bool) {
	defer close(r.done)
	buf := make([]byte, Snaplen)
	for {
		select {
		case <-r.stop:
			return
		default:
		}
		n, from, err := unix.Recvfrom(r.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if !ok {
			continue
		}
		switch ll.Hatype {
		case unix.ARPHRD_ETHER:
		case unix.ARPHRD_LOOPBACK:
			if ll.Pkttype == unix.PACKET_OUTGOING {
				continue // loopback shows each packet twice
			}
		default:
			continue // no Ethernet header (a TUN such as tmhost)
		}
		outgoing := ll.Pkttype == unix.PACKET_OUTGOING
		emit(buf[:n], outgoing == outIsOutgoing)
	}
}

// openPacketSocket opens the socket inside netnsPath on a locked thread
// (a socket stays in the namespace it was created in).
func openPacketSocket(netnsPath, ifname string, filter []bpf.Instruction) (int, error) {
	if netnsPath == "" {
		return packetSocketHere(ifname, filter)
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() { // RoutineNetnsSocket: a thread that may be left in the pod's namespace dies with it
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- result{-1, fmt.Errorf("current netns: %w", err)}
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(netnsPath)
		if err != nil {
			ch <- result{-1, fmt.Errorf("open netns %q: %w", netnsPath, err)}
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			ch <- result{-1, fmt.Errorf("enter netns %q: %w", netnsPath, err)}
			runtime.UnlockOSThread()
			return
		}
		fd, err := packetSocketHere(ifname, filter)
		ch <- result{fd, err}
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the thread ends with this goroutine, still locked
	}()
	res := <-ch
	return res.fd, res.err
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// packetSocketHere opens an AF_PACKET socket in the current namespace
// that receives nothing until its filter is in place: it is made with
// protocol 0 (no packets queued), the filter attached, and only then bound
// to ETH_P_ALL (and ifname, "" for every interface). Opened with
// ETH_P_ALL it would queue every packet of the namespace, unfiltered,
// from socket() until the filter is attached.
func packetSocketHere(ifname string, filter []bpf.Instruction) (int, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	if len(filter) > 0 {
		if err := attachFilter(fd, filter); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	ifindex := 0
	if ifname != "" {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("interface %q: %w", ifname, err)
		}
		ifindex = ifi.Index
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind packet socket to %q: %w", ifname, err)
	}
	return fd, nil
}

// attachFilter sets a classic BPF program on fd.
func attachFilter(fd int, filter []bpf.Instruction) error {
	prog, err := bpf.Assemble(filter)
	if err != nil {
		return fmt.Errorf("assemble packet filter: %w", err)
	}
	f := make([]unix.SockFilter, len(prog))
	for i, ins := range prog {
		f[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}); err != nil {
		return fmt.Errorf("attach packet filter: %w", err)
	}
	return nil
}

// portFilter is the classic BPF program of attachPortFilter.
func portFilter(port uint16) []bpf.Instruction {
	p := uint32(port)
	return []bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 12, Size: 2}, // EtherType
		/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x0800, SkipFalse: 9},
		/* 2 */ bpf.LoadAbsolute{Off: 23, Size: 1}, // IPv4 protocol
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 15},
		/* 4 */ bpf.LoadAbsolute{Off: 20, Size: 2}, // fragment offset
		/* 5 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x1fff, SkipTrue: 13},
		/* 6 */ bpf.LoadMemShift{Off: 14}, // X = IPv4 header length
		/* 7 */ bpf.LoadIndirect{Off: 14, Size: 2}, // source port
		/* 8 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: p, SkipTrue: 9},
		/* 9 */ bpf.LoadIndirect{Off: 16, Size: 2}, // destination port
		/* 10 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: p, SkipTrue: 7, SkipFalse: 8},
		/* 11 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x86dd, SkipFalse: 7}, // A is still the EtherType
		/* 12 */ bpf.LoadAbsolute{Off: 20, Size: 1}, // IPv6 next header
		/* 13 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 5},
		/* 14 */ bpf.LoadAbsolute{Off: 54, Size: 2},
		/* 15 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: p, SkipTrue: 2},
		/* 16 */ bpf.LoadAbsolute{Off: 56, Size: 2},
		/* 17 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: p, SkipFalse: 1},
		/* 18 */ bpf.RetConstant{Val: Snaplen},
		/* 19 */ bpf.RetConstant{Val: 0},
	}
}
