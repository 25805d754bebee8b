package mux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Frame types. See the package doc for what each carries.
const (
	FrameData   byte = 0x00
	FrameEnd    byte = 0x01
	FrameReset  byte = 0x02
	FrameWindow byte = 0x03
	FrameOpen   byte = 0x04
	FrameReply  byte = 0x05
)

const (
	// HeaderLen is the size of every frame header.
	HeaderLen = 8
	// MaxPayload bounds a frame's payload: one TLS record's worth, so that
	// a stream never holds the connection for longer than one record and
	// the streams of a connection interleave finely (no head-of-line
	// blocking behind a large frame).
	MaxPayload = 16 << 10
	// MaxOpenPayload bounds an Open frame's payload (the tunnel header).
	MaxOpenPayload = 512
	// maxWindow is the largest window a receiver may grant (HTTP/2's).
	maxWindow = 1<<31 - 1
)

// ErrProtocol means the peer broke the framing or the stream state
// machine: the whole connection is closed and every stream on it is cut.
var ErrProtocol = errors.New("mux: protocol error")

// Frame is a decoded frame header.
type Frame struct {
	Type   byte
	Stream uint32
	Len    int
}

// appendHeader appends a frame header.
func appendHeader(b []byte, typ byte, stream uint32, n int) []byte {
	b = append(b, typ, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(n))
	return binary.BigEndian.AppendUint32(b, stream)
}

// ParseHeader decodes and checks one frame header: the checks that need no
// stream state. It is the first line of the parser and what the fuzz test
// drives; the session checks the rest (direction, stream state, windows).
func ParseHeader(h [HeaderLen]byte) (Frame, error) {
	f := Frame{Type: h[0], Len: int(binary.BigEndian.Uint16(h[2:4])), Stream: binary.BigEndian.Uint32(h[4:8])}
	if h[1] != 0 {
		return f, fmt.Errorf("%w: frame type %#02x with reserved flags %#02x", ErrProtocol, f.Type, h[1])
	}
	if f.Len > MaxPayload {
		return f, fmt.Errorf("%w: frame type %#02x length %d above %d", ErrProtocol, f.Type, f.Len, MaxPayload)
	}
	ok := false
	switch f.Type {
	case FrameData:
		ok = f.Stream != 0 && f.Len > 0
	case FrameEnd, FrameReset:
		ok = f.Stream != 0 && f.Len == 0
	case FrameWindow:
		ok = f.Len == 4 // stream 0 is the connection's window
	case FrameOpen:
		ok = f.Stream%2 == 1 && f.Len > 0 && f.Len <= MaxOpenPayload
	case FrameReply:
		ok = f.Stream != 0 && (f.Len == 1 || f.Len == 2)
	default:
		return f, fmt.Errorf("%w: unknown frame type %#02x", ErrProtocol, f.Type)
	}
	if !ok {
		return f, fmt.Errorf("%w: frame type %#02x on stream %d with length %d", ErrProtocol, f.Type, f.Stream, f.Len)
	}
	return f, nil
}

// ReadFrame reads one frame header and its payload into buf (grown if
// needed) and returns both. It is the parser the session uses, apart from
// Data frames, whose payload the session reads straight into the stream's
// receive buffer.
func ReadFrame(r io.Reader, buf []byte) (Frame, []byte, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, nil, err
	}
	f, err := ParseHeader(h)
	if err != nil {
		return f, nil, err
	}
	if cap(buf) < f.Len {
		buf = make([]byte, f.Len)
	}
	buf = buf[:f.Len]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return f, nil, err
	}
	return f, buf, nil
}
