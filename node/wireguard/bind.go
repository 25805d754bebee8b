package wireguard

import (
	"encoding/binary"
	"fmt"
	"runtime"

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

// inNetns runs fn on a locked OS thread inside the namespace at nsPath and
// switches back. If switching back fails the thread stays locked, so the
// runtime discards it with the goroutine... which is this one: fn runs on
// a goroutine of its own.
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
