package tunnel

import (
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Reply status bytes, the first byte the server sends.
//
// Zero is not a status, so a stream of zero bytes (or a peer that is not a
// tunmesh agent) is never mistaken for an acceptance.
const (
	ReplyOK      byte = 0x01
	ReplyRefused byte = 0x02
)

// Reason says why a server refused a tunnel. It travels as the byte after
// ReplyRefused.
type Reason uint8

// Reasons a server refuses a tunnel. ReasonNone is not a refusal: passed to
// WriteReply it sends ReplyOK.
const (
	ReasonNone Reason = 0
	// ReasonUnknownDestination: the destination is not a meshed pod on the
	// server's node (or the port is not served through the mesh).
	ReasonUnknownDestination Reason = 1
	// ReasonSourceNotOwned: the source address is not a pod running with the
	// identity of the client certificate.
	ReasonSourceNotOwned Reason = 2
	// ReasonDialFailed: the server could not connect to the destination pod
	// (refused, unreachable or timed out).
	ReasonDialFailed Reason = 3
	// ReasonPolicy: authorization policy denies this source the destination.
	ReasonPolicy Reason = 4
	// ReasonBadHeader: the server could not accept the header (for example a
	// version it does not speak), so a client can tell a protocol mismatch
	// during a rollout from a policy decision.
	ReasonBadHeader Reason = 5
	// ReasonBusy: the server is at a limit (streams per connection or
	// per peer); the client may try again, on another connection.
	ReasonBusy Reason = 6
)

// ErrInvalidReply means the server's first byte is no reply status, or it
// refused with reason zero.
var ErrInvalidReply = errors.New("tunnel: invalid reply")

// String returns a short lowercase description, fit for logs and metrics
// labels. Unknown reasons print as "reason(N)".
func (r Reason) String() string {
	switch r {
	case ReasonNone:
		return "none"
	case ReasonUnknownDestination:
		return "unknown destination"
	case ReasonSourceNotOwned:
		return "source not owned by client identity"
	case ReasonDialFailed:
		return "dial failed"
	case ReasonPolicy:
		return "denied by policy"
	case ReasonBadHeader:
		return "bad header"
	case ReasonBusy:
		return "busy"
	default:
		return "reason(" + strconv.Itoa(int(r)) + ")"
	}
}

// RefusedError is returned by ReadReply when the server refused the tunnel.
// Reason may be a value this package does not know if the server is newer.
type RefusedError struct {
	Reason Reason
}

func (e *RefusedError) Error() string {
	return "tunnel refused: " + e.Reason.String()
}

// WriteReply sends the server's answer to a header: ReplyOK for ReasonNone,
// otherwise ReplyRefused followed by the reason, in a single Write.
func WriteReply(w io.Writer, reason Reason) error {
	b := []byte{ReplyOK}
	if reason != ReasonNone {
		b = []byte{ReplyRefused, byte(reason)}
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write tunnel reply: %w", err)
	}
	return nil
}

// ReadReply reads the server's answer: nil for ReplyOK, a *RefusedError for
// ReplyRefused, or an error wrapping ErrInvalidReply, ErrTruncated or r's own
// error. Like ReadHeader it reads one or two bytes and never more.
//
// On TLS 1.3 the client's handshake completes before the server has checked
// the client certificate, so a rejected certificate shows up here, as the
// TLS alert error r returns.
func ReadReply(r io.Reader) error {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return readError("read tunnel reply", err)
	}
	switch b[0] {
	case ReplyOK:
		return nil
	case ReplyRefused:
	default:
		return fmt.Errorf("read tunnel reply: %w: status %#02x", ErrInvalidReply, b[0])
	}
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return readError("read tunnel reply", err)
	}
	if Reason(b[0]) == ReasonNone {
		return fmt.Errorf("read tunnel reply: %w: refused without a reason", ErrInvalidReply)
	}
	return &RefusedError{Reason: Reason(b[0])}
}
