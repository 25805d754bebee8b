package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Protocol constants of the header; see the package doc for the layout.
const (
	// Magic opens every header. It lets a server tell a tunmesh client from
	// anything else that completed a TLS handshake with it.
	Magic = "TMSH"
	// Version is the only header version this package speaks. Version 2
	// frames the data phase (see FramedConn), so a cut stream is told from
	// a clean end; a version 1 peer would take a truncation for success,
	// so the two refuse each other (ReasonBadHeader) instead of
	// interoperating.
	Version = 2
	// MaxBodyLen bounds the body length field of every version. A reader
	// rejects larger values before reading (or allocating) the body.
	MaxBodyLen = 512

	// fixedLen is the framing part: magic, version, flags, body length.
	fixedLen = len(Magic) + 1 + 1 + 2

	family4 = 4
	family6 = 6
	// bodyLen4 and bodyLen6 are the only body lengths versions 1 and 2 accept:
	// family byte, destination address, destination port, source address.
	bodyLen4 = 1 + 4 + 2 + 4
	bodyLen6 = 1 + 16 + 2 + 16
)

// Errors returned by ReadHeader, UnmarshalBinary and MarshalBinary. They are
// returned wrapped with detail; compare with errors.Is.
var (
	// ErrBadMagic means the peer does not speak this protocol.
	ErrBadMagic = errors.New("tunnel: bad magic")
	// ErrUnsupportedVersion means the peer speaks another header version.
	ErrUnsupportedVersion = errors.New("tunnel: unsupported version")
	// ErrOversized means the declared body length is above MaxBodyLen.
	ErrOversized = errors.New("tunnel: header body too large")
	// ErrTruncated means the stream ended inside a header or reply. It wraps
	// io.ErrUnexpectedEOF, so errors.Is(err, io.ErrUnexpectedEOF) holds too.
	// A stream that ends before the first byte is truncated as well: after a
	// TLS handshake, the client owes us a header.
	ErrTruncated = fmt.Errorf("tunnel: truncated: %w", io.ErrUnexpectedEOF)
	// ErrInvalidHeader means the header is framed correctly but its content
	// is not acceptable: reserved flags, a body length or family that version
	// 1 does not define, or addresses that fail validation.
	ErrInvalidHeader = errors.New("tunnel: invalid header")
)

// Header is what the client agent tells the server agent about the pod
// connection a tunnel carries.
type Header struct {
	// Dst is the original destination the source pod connected to, after
	// service resolution: a pod address and port on the server's node.
	Dst netip.AddrPort
	// Src is the source pod's address. The server checks that it belongs to
	// a pod with the identity of the client certificate, and dials the
	// destination with it as the source address.
	Src netip.Addr
}

// MarshalBinary returns the wire form of h. It fails with ErrInvalidHeader if
// h would not pass ReadHeader's validation.
func (h Header) MarshalBinary() ([]byte, error) {
	return h.AppendBinary(make([]byte, 0, fixedLen+bodyLen6))
}

// AppendBinary appends the wire form of h to b, as MarshalBinary.
func (h Header) AppendBinary(b []byte) ([]byte, error) {
	if err := h.validate(); err != nil {
		return b, fmt.Errorf("marshal tunnel header: %w", err)
	}
	family, bodyLen := byte(family4), bodyLen4
	if h.Dst.Addr().Is6() {
		family, bodyLen = family6, bodyLen6
	}
	b = append(b, Magic...)
	b = append(b, Version, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(bodyLen))
	b = append(b, family)
	b = append(b, h.Dst.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, h.Dst.Port())
	b = append(b, h.Src.AsSlice()...)
	return b, nil
}

// UnmarshalBinary parses a header that must fill data exactly.
func (h *Header) UnmarshalBinary(data []byte) error {
	r := bytes.NewReader(data)
	parsed, err := ReadHeader(r)
	if err != nil {
		return err
	}
	if r.Len() != 0 {
		return fmt.Errorf("read tunnel header: %w: %d trailing bytes", ErrInvalidHeader, r.Len())
	}
	*h = parsed
	return nil
}

// WriteHeader writes the wire form of h to w in a single Write, so that on a
// TLS connection the header travels in one record.
func WriteHeader(w io.Writer, h Header) error {
	b, err := h.MarshalBinary()
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write tunnel header: %w", err)
	}
	return nil
}

// ReadHeader reads one header from r and validates it. It reads exactly the
// header's bytes and never more, since what follows on the stream is
// application data; r needs no buffering.
//
// Errors wrap ErrBadMagic, ErrUnsupportedVersion, ErrOversized, ErrTruncated,
// ErrInvalidHeader, or the error r returned. Checks run in wire order, so the
// first offending field decides the error.
func ReadHeader(r io.Reader) (Header, error) {
	var fixed [fixedLen]byte
	// The magic is read on its own so that a peer speaking something else
	// (a plaintext HTTP request, say) gets ErrBadMagic even if it sent fewer
	// than fixedLen bytes and is now waiting for an answer.
	if _, err := io.ReadFull(r, fixed[:len(Magic)]); err != nil {
		return Header{}, readError("read tunnel header", err)
	}
	if string(fixed[:len(Magic)]) != Magic {
		return Header{}, fmt.Errorf("read tunnel header: %w %q", ErrBadMagic, fixed[:len(Magic)])
	}
	if _, err := io.ReadFull(r, fixed[len(Magic):]); err != nil {
		return Header{}, readError("read tunnel header", err)
	}
	if v := fixed[4]; v != Version {
		return Header{}, fmt.Errorf("read tunnel header: %w %d (want %d)", ErrUnsupportedVersion, v, Version)
	}
	n := int(binary.BigEndian.Uint16(fixed[6:8]))
	if n > MaxBodyLen {
		return Header{}, fmt.Errorf("read tunnel header: %w: %d bytes (max %d)", ErrOversized, n, MaxBodyLen)
	}
	// Read the whole declared body before judging it, so that framing errors
	// (the stream ended early) and content errors stay distinct and any
	// prefix of any framed header reports ErrTruncated.
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return Header{}, readError("read tunnel header", err)
	}
	h, err := parseBody(fixed[5], body)
	if err != nil {
		return Header{}, fmt.Errorf("read tunnel header: %w", err)
	}
	return h, nil
}

// parseBody decodes and validates a version 1 body.
func parseBody(flags byte, body []byte) (Header, error) {
	if flags != 0 {
		return Header{}, fmt.Errorf("%w: reserved flags %#02x set", ErrInvalidHeader, flags)
	}
	if len(body) == 0 {
		return Header{}, fmt.Errorf("%w: empty body", ErrInvalidHeader)
	}
	var dst, src netip.Addr
	var port uint16
	switch family := body[0]; {
	case family == family4 && len(body) == bodyLen4:
		dst = netip.AddrFrom4([4]byte(body[1:5]))
		port = binary.BigEndian.Uint16(body[5:7])
		src = netip.AddrFrom4([4]byte(body[7:11]))
	case family == family6 && len(body) == bodyLen6:
		dst = netip.AddrFrom16([16]byte(body[1:17]))
		port = binary.BigEndian.Uint16(body[17:19])
		src = netip.AddrFrom16([16]byte(body[19:35]))
	case family == family4 || family == family6:
		return Header{}, fmt.Errorf("%w: body length %d for family %d", ErrInvalidHeader, len(body), family)
	default:
		return Header{}, fmt.Errorf("%w: unknown address family %d", ErrInvalidHeader, family)
	}
	h := Header{Dst: netip.AddrPortFrom(dst, port), Src: src}
	if err := h.validate(); err != nil {
		return Header{}, err
	}
	return h, nil
}

// validate is the one place that decides which headers are acceptable; both
// MarshalBinary and ReadHeader use it, so a header that marshals also parses.
func (h Header) validate() error {
	if err := checkAddr("destination", h.Dst.Addr()); err != nil {
		return err
	}
	if h.Dst.Port() == 0 {
		return fmt.Errorf("%w: destination port 0", ErrInvalidHeader)
	}
	if err := checkAddr("source", h.Src); err != nil {
		return err
	}
	if h.Dst.Addr().Is4() != h.Src.Is4() {
		return fmt.Errorf("%w: destination %s and source %s differ in address family", ErrInvalidHeader, h.Dst.Addr(), h.Src)
	}
	return nil
}

// checkAddr accepts addresses a pod can have. See the package doc for why
// loopback and link-local addresses are refused here and not only by policy.
func checkAddr(which string, a netip.Addr) error {
	var why string
	switch {
	case !a.IsValid():
		why = "missing"
	case a.Zone() != "":
		// Zones are local to a host and cannot cross the tunnel.
		why = "has a zone"
	case a.Is4In6():
		// One address, one encoding: IPv4 travels as family 4.
		why = "is IPv4-mapped IPv6"
	case a.IsUnspecified():
		why = "is unspecified"
	case a.IsMulticast():
		why = "is multicast"
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		why = "is the broadcast address"
	case a.IsLoopback():
		why = "is loopback"
	case a.IsLinkLocalUnicast():
		why = "is link-local"
	default:
		return nil
	}
	return fmt.Errorf("%w: %s address %v %s", ErrInvalidHeader, which, a, why)
}

// readError maps the end of the stream inside a message to ErrTruncated and
// keeps every other error (a TLS alert, a deadline, a reset) as it is.
func readError(op string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%s: %w", op, ErrTruncated)
	}
	return fmt.Errorf("%s: %w", op, err)
}
