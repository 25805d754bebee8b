package wireguard

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"slices"

	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// nsBind wraps a Bind so that its sockets open in a given network
// namespace, whichever thread calls Open (wireguard-go opens them on the
// thread that brings the device up, which may have entered a pod's
// namespace), and so that datagrams that are not WireGuard messages are
// dropped and counted before wireguard-go sees them.
type nsBind struct {
	conn.Bind
	nsPath  string
	garbage func() // counts one malformed datagram
	// maxDatagram is the largest UDP payload the underlay carries without
	// fragments (0: no limit). wireguard-go coalesces a batch of
	// same-sized datagrams into one UDP GSO send, which the kernel refuses
	// (EINVAL: the whole batch lost) when a segment is larger than the
	// path MTU; batches with larger datagrams (an overlay MTU above the
	// underlay's) are sent one datagram at a time, which the kernel
	// fragments.
	maxDatagram int
}

// Send sends bufs to ep, one datagram at a time when one of them is over
// maxDatagram (see there).
func (b *nsBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if b.maxDatagram == 0 || len(bufs) < 2 || !slices.ContainsFunc(bufs, func(p []byte) bool { return len(p) > b.maxDatagram }) {
		return b.Bind.Send(bufs, ep)
	}
	var first error
	for i := range bufs {
		if err := b.Bind.Send(bufs[i:i+1], ep); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Open opens the inner bind inside nsPath on a locked thread.
func (b *nsBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	var (
		fns    []conn.ReceiveFunc
		actual uint16
		err    error
	)
	if b.nsPath == "" {
		fns, actual, err = b.Bind.Open(port)
	} else if err = inNetns(b.nsPath, func() error {
		var oerr error
		fns, actual, oerr = b.Bind.Open(port)
		return oerr
	}); err != nil {
		return nil, 0, err
	}
	if err != nil {
		return nil, 0, err
	}
	wrapped := make([]conn.ReceiveFunc, len(fns))
	for i, fn := range fns {
		wrapped[i] = b.filter(fn)
	}
	return wrapped, actual, nil
}

// filter zeroes the size of malformed datagrams (wireguard-go skips
// packets of size zero) and counts them.
func (b *nsBind) filter(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, err := fn(packets, sizes, eps)
		for i := 0; i < n; i++ {
			if sizes[i] > 0 && !wellFormed(packets[i][:sizes[i]]) {
				sizes[i] = 0
				if b.garbage != nil {
					b.garbage()
				}
			}
		}
		return n, err
	}
}

// wellFormed reports whether p has the type, reserved bytes and size of a
// WireGuard message (the cryptographic checks are wireguard-go's).
func wellFormed(p []byte) bool {
	if len(p) < 4 {
		return false
	}
	switch binary.LittleEndian.Uint32(p[:4]) {
	case device.MessageInitiationType:
		return len(p) == device.MessageInitiationSize
	case device.MessageResponseType:
		return len(p) == device.MessageResponseSize
	case device.MessageCookieReplyType:
		return len(p) == device.MessageCookieReplySize
	case device.MessageTransportType:
		return len(p) >= device.MessageTransportSize
	}
	return false
}

// inNetns runs fn inside the namespace at nsPath, on a locked OS thread
// of a goroutine of its own, and switches back. If switching back fails,
// the thread stays locked and the runtime discards it when that goroutine
// ends, so no other goroutine ever runs in the wrong namespace.
func inNetns(nsPath string, fn func() error) error {
	errc := make(chan error, 1)
	go func() { // RoutineInNetns: ends after fn
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("current netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns %q: %w", nsPath, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %q: %w", nsPath, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and dies with this goroutine.
			errc <- fmt.Errorf("leave netns %q: %w", nsPath, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
