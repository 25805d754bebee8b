// Package rawio reads and writes non-blocking file descriptors with raw
// system calls: calls that do not enter the Go scheduler's syscall path.
//
// Why: every ordinary system call goes through runtime.entersyscall, and
// the first one after the whole process was idle wakes the runtime's
// sysmon thread from its deep sleep, which then polls every 20 µs until the
// process is idle again. An agent that forwards a request/response flow
// goes idle between every two messages, so each message paid a futex wake
// of sysmon and a burst of sysmon wake-ups: on the 2-CPU test VM, twice the
// context switches of the same ping-pong with raw calls (see
// docs/performance.md, "Round trip").
//
// A raw call keeps the goroutine's P for its whole duration: use it only on
// non-blocking descriptors (TUN devices, sockets in the netpoller), where a
// call returns EAGAIN instead of waiting. Waiting for readiness stays with
// the netpoller: the helpers here are meant to run inside a
// syscall.RawConn's Read or Write callback.
package rawio

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read reads into p from the non-blocking fd, retrying on EINTR.
func Read(fd uintptr, p []byte) (int, error) { return call(unix.SYS_READ, fd, p) }

// Write writes p to the non-blocking fd once (it may write less than p),
// retrying on EINTR.
func Write(fd uintptr, p []byte) (int, error) { return call(unix.SYS_WRITE, fd, p) }

// call makes the raw read or write system call trap on fd with p.
func call(trap, fd uintptr, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	return retry(trap, fd, uintptr(ptr), uintptr(len(p)))
}

// retry makes the raw system call trap, again while it is interrupted
// (EINTR), and returns its count or its error.
func retry(trap, a1, a2, a3 uintptr) (int, error) {
	for {
		n, _, e := unix.RawSyscall(trap, a1, a2, a3)
		switch e {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		default:
			return 0, e
		}
	}
}

// Writev writes bufs to the non-blocking fd with one writev, retrying on
// EINTR. iov is scratch space for the iovecs, reused across calls so that a
// write allocates nothing; the grown slice is returned for the next call
// (its entries are cleared, so it keeps no buffer alive).
func Writev(fd uintptr, bufs [][]byte, iov []unix.Iovec) (int, []unix.Iovec, error) {
	iov = iov[:0]
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		iov = append(iov, v)
	}
	defer clear(iov)
	if len(iov) == 0 {
		return 0, iov, nil
	}
	n, err := retry(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
	return n, iov, err
}
