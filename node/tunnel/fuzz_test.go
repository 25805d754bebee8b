package tunnel_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

// headerErrors are all the errors ReadHeader may wrap when reading from a
// bytes.Reader, which never fails otherwise.
var headerErrors = []error{
	tunnel.ErrBadMagic,
	tunnel.ErrUnsupportedVersion,
	tunnel.ErrOversized,
	tunnel.ErrTruncated,
	tunnel.ErrInvalidHeader,
}

// FuzzReadHeader checks that ReadHeader never panics, never consumes more
// than the header it was given declares, fails only with its own sentinel
// errors, and that what it accepts is canonical: MarshalBinary gives back
// exactly the bytes consumed.
func FuzzReadHeader(f *testing.F) {
	for _, h := range []tunnel.Header{
		hdr4,
		hdr6,
		{Dst: netip.MustParseAddrPort("1.2.3.4:1"), Src: netip.MustParseAddr("5.6.7.8")},
	} {
		b := mustMarshal(f, h)
		f.Add(b)
		f.Add(append(b, "trailing application data"...))
		f.Add(b[:len(b)-1])
	}
	f.Add([]byte{})
	f.Add([]byte("TMSH"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(header(2, 0, 0xffff))
	f.Add(header(2, 0, 11, body4([4]byte{10, 0, 0, 1}, 80, [4]byte{10, 0, 0, 2})...))
	f.Add(header(2, 1, 11, body4([4]byte{10, 0, 0, 1}, 80, [4]byte{10, 0, 0, 2})...))
	f.Add(header(2, 0, 35, body6("::ffff:1.2.3.4", 80, "::ffff:1.2.3.5")...))

	f.Fuzz(func(t *testing.T, data []byte) {
		r := &countingReader{r: bytes.NewReader(data)}
		h, err := tunnel.ReadHeader(r)

		// The most ReadHeader may consume: the fixed part, and the body only
		// if the fixed part is there and declares one within bounds.
		limit := 8
		if len(data) >= 8 {
			if n := int(binary.BigEndian.Uint16(data[6:8])); n <= tunnel.MaxBodyLen {
				limit += n
			}
		}
		if r.n > limit {
			t.Fatalf("consumed %d bytes, header declares at most %d", r.n, limit)
		}

		if err != nil {
			known := false
			for _, e := range headerErrors {
				known = known || errors.Is(err, e)
			}
			if !known {
				t.Fatalf("ReadHeader error %v is none of the package's errors", err)
			}
			if h != (tunnel.Header{}) {
				t.Fatalf("ReadHeader returned %+v with error %v", h, err)
			}
			return
		}
		if r.n != limit {
			t.Fatalf("accepted after consuming %d bytes, header declares %d", r.n, limit)
		}
		b, err := h.MarshalBinary()
		if err != nil {
			t.Fatalf("accepted header %+v does not marshal: %v", h, err)
		}
		if !bytes.Equal(b, data[:r.n]) {
			t.Fatalf("round trip:\n  in %x\n out %x", data[:r.n], b)
		}
		var u tunnel.Header
		if err := u.UnmarshalBinary(b); err != nil || u != h {
			t.Fatalf("UnmarshalBinary(MarshalBinary(h)) = %+v, %v; want %+v", u, err, h)
		}
	})
}

// FuzzReadReply checks that ReadReply never panics, reads at most two bytes,
// and only accepts what WriteReply produces.
func FuzzReadReply(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{tunnel.ReplyOK})
	f.Add([]byte{tunnel.ReplyRefused, byte(tunnel.ReasonPolicy)})
	f.Add([]byte{tunnel.ReplyRefused, 0})
	f.Add([]byte("HTTP/1.1 200 OK"))

	f.Fuzz(func(t *testing.T, data []byte) {
		r := &countingReader{r: bytes.NewReader(data)}
		err := tunnel.ReadReply(r)
		if r.n > 2 {
			t.Fatalf("consumed %d bytes", r.n)
		}
		var refused *tunnel.RefusedError
		var reason tunnel.Reason
		switch {
		case err == nil:
		case errors.As(err, &refused):
			reason = refused.Reason
		case errors.Is(err, tunnel.ErrInvalidReply), errors.Is(err, tunnel.ErrTruncated):
			return
		default:
			t.Fatalf("ReadReply error %v is none of the package's errors", err)
		}
		var buf bytes.Buffer
		if err := tunnel.WriteReply(&buf, reason); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), data[:r.n]) {
			t.Fatalf("accepted %x, WriteReply gives %x", data[:r.n], buf.Bytes())
		}
	})
}

// FuzzFramedRead: whatever a peer sends in the data phase, reading never
// panics, never returns more data than was sent, and ends with io.EOF only
// after an End frame.
func FuzzFramedRead(f *testing.F) {
	f.Add([]byte{tunnel.FrameData, 0, 2, 'h', 'i', tunnel.FrameEnd, 0, 0})
	f.Add([]byte{tunnel.FrameData, 0, 5, 'h', 'i'})
	f.Add([]byte{tunnel.FrameReset, 0, 0})
	f.Add([]byte{tunnel.FrameData, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		c := tunnel.NewFramedConn(&readerConn{r: bytes.NewReader(in)})
		got, err := io.ReadAll(c)
		if len(got) > len(in) {
			t.Fatalf("read %d bytes from %d", len(got), len(in))
		}
		if err == nil && !bytes.Contains(in, []byte{tunnel.FrameEnd, 0, 0}) {
			t.Fatalf("clean end without an End frame in %x", in)
		}
	})
}

// readerConn is a net.Conn that reads from r.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }
