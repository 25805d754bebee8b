package tunnel_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"testing"
	"testing/iotest"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

var (
	hdr4 = tunnel.Header{
		Dst: netip.MustParseAddrPort("10.244.1.7:8080"),
		Src: netip.MustParseAddr("10.244.2.9"),
	}
	hdr6 = tunnel.Header{
		Dst: netip.MustParseAddrPort("[fd00:10:244:1::7]:443"),
		Src: netip.MustParseAddr("fd00:10:244:2::9"),
	}
)

func mustMarshal(t testing.TB, h tunnel.Header) []byte {
	t.Helper()
	b, err := h.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary(%+v): %v", h, err)
	}
	return b
}

// TestHeaderWireFormat pins the bytes, so a change to the encoding is a
// deliberate one (and a version bump).
func TestHeaderWireFormat(t *testing.T) {
	want4 := []byte{
		'T', 'M', 'S', 'H', 2, 0, 0, 11,
		4, 10, 244, 1, 7, 0x1f, 0x90, 10, 244, 2, 9,
	}
	if got := mustMarshal(t, hdr4); !bytes.Equal(got, want4) {
		t.Errorf("v4 header:\n got %x\nwant %x", got, want4)
	}
	want6 := []byte{'T', 'M', 'S', 'H', 2, 0, 0, 35, 6}
	want6 = append(want6, hdr6.Dst.Addr().AsSlice()...)
	want6 = append(want6, 0x01, 0xbb)
	want6 = append(want6, hdr6.Src.AsSlice()...)
	if got := mustMarshal(t, hdr6); !bytes.Equal(got, want6) {
		t.Errorf("v6 header:\n got %x\nwant %x", got, want6)
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []tunnel.Header{
		hdr4,
		hdr6,
		{Dst: netip.MustParseAddrPort("192.168.0.1:65535"), Src: netip.MustParseAddr("8.8.8.8")},
		{Dst: netip.MustParseAddrPort("[2001:db8::1]:1"), Src: netip.MustParseAddr("2001:db8::2")},
	} {
		t.Run(h.Dst.String(), func(t *testing.T) {
			const appData = "GET / HTTP/1.1\r\n"
			wire := append(mustMarshal(t, h), appData...)
			// One byte at a time: the parser must not rely on short reads
			// returning whole fields.
			r := bytes.NewReader(wire)
			got, err := tunnel.ReadHeader(iotest.OneByteReader(r))
			if err != nil {
				t.Fatalf("ReadHeader: %v", err)
			}
			if got != h {
				t.Errorf("ReadHeader = %+v, want %+v", got, h)
			}
			rest, _ := io.ReadAll(r)
			if string(rest) != appData {
				t.Errorf("left on the stream %q, want %q: ReadHeader read past the header", rest, appData)
			}

			var u tunnel.Header
			if err := u.UnmarshalBinary(wire[:len(wire)-len(appData)]); err != nil || u != h {
				t.Errorf("UnmarshalBinary = %+v, %v; want %+v", u, err, h)
			}
			if err := u.UnmarshalBinary(wire); !errors.Is(err, tunnel.ErrInvalidHeader) {
				t.Errorf("UnmarshalBinary with trailing bytes: %v, want ErrInvalidHeader", err)
			}
		})
	}
}

// countingWriter records each Write call.
type countingWriter struct {
	bytes.Buffer
	writes int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes++
	return w.Buffer.Write(p)
}

func TestWriteHeader(t *testing.T) {
	var w countingWriter
	if err := tunnel.WriteHeader(&w, hdr6); err != nil {
		t.Fatalf("WriteHeader: %v", err)
	}
	if w.writes != 1 {
		t.Errorf("WriteHeader used %d writes, want 1 (one TLS record)", w.writes)
	}
	if !bytes.Equal(w.Bytes(), mustMarshal(t, hdr6)) {
		t.Errorf("WriteHeader wrote %x", w.Bytes())
	}
	if err := tunnel.WriteHeader(&w, tunnel.Header{}); !errors.Is(err, tunnel.ErrInvalidHeader) {
		t.Errorf("WriteHeader(zero header) = %v, want ErrInvalidHeader", err)
	}
	errBoom := errors.New("boom")
	if err := tunnel.WriteHeader(errWriter{errBoom}, hdr4); !errors.Is(err, errBoom) {
		t.Errorf("WriteHeader on failing writer = %v, want %v", err, errBoom)
	}
}

type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestMarshalInvalid(t *testing.T) {
	ap := netip.MustParseAddrPort
	a := netip.MustParseAddr
	for _, tc := range []struct {
		name string
		h    tunnel.Header
	}{
		{"zero", tunnel.Header{}},
		{"no source", tunnel.Header{Dst: hdr4.Dst}},
		{"no destination", tunnel.Header{Src: hdr4.Src}},
		{"v4 zero port", tunnel.Header{Dst: ap("10.0.0.1:0"), Src: a("10.0.0.2")}},
		{"v6 zero port", tunnel.Header{Dst: ap("[fd00::1]:0"), Src: a("fd00::2")}},
		{"v4 dst v6 src", tunnel.Header{Dst: hdr4.Dst, Src: hdr6.Src}},
		{"v6 dst v4 src", tunnel.Header{Dst: hdr6.Dst, Src: hdr4.Src}},
		{"v4-mapped dst", tunnel.Header{Dst: ap("[::ffff:10.0.0.1]:80"), Src: a("::ffff:10.0.0.2")}},
		{"v4-mapped src", tunnel.Header{Dst: ap("[fd00::1]:80"), Src: a("::ffff:10.0.0.2")}},
		{"zone", tunnel.Header{Dst: ap("[fd00::1%eth0]:80"), Src: a("fd00::2")}},
		{"v4 unspecified dst", tunnel.Header{Dst: ap("0.0.0.0:80"), Src: a("10.0.0.2")}},
		{"v4 unspecified src", tunnel.Header{Dst: ap("10.0.0.1:80"), Src: a("0.0.0.0")}},
		{"v6 unspecified dst", tunnel.Header{Dst: ap("[::]:80"), Src: a("fd00::2")}},
		{"v6 unspecified src", tunnel.Header{Dst: ap("[fd00::1]:80"), Src: a("::")}},
		{"v4 multicast dst", tunnel.Header{Dst: ap("224.0.0.1:80"), Src: a("10.0.0.2")}},
		{"v4 multicast src", tunnel.Header{Dst: ap("10.0.0.1:80"), Src: a("239.1.2.3")}},
		{"v6 multicast dst", tunnel.Header{Dst: ap("[ff02::1]:80"), Src: a("fd00::2")}},
		{"v4 broadcast", tunnel.Header{Dst: ap("255.255.255.255:80"), Src: a("10.0.0.2")}},
		{"v4 loopback", tunnel.Header{Dst: ap("127.0.0.1:80"), Src: a("10.0.0.2")}},
		{"v6 loopback", tunnel.Header{Dst: ap("[::1]:80"), Src: a("fd00::2")}},
		{"v4 link-local (metadata)", tunnel.Header{Dst: ap("169.254.169.254:80"), Src: a("10.0.0.2")}},
		{"v6 link-local", tunnel.Header{Dst: ap("[fe80::1]:80"), Src: a("fd00::2")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.h.MarshalBinary()
			if !errors.Is(err, tunnel.ErrInvalidHeader) {
				t.Errorf("MarshalBinary(%+v) = %x, %v; want ErrInvalidHeader", tc.h, b, err)
			}
		})
	}
}

// header builds wire bytes by hand, for inputs MarshalBinary refuses to make.
func header(version, flags byte, bodyLen int, body ...byte) []byte {
	b := []byte{'T', 'M', 'S', 'H', version, flags}
	b = binary.BigEndian.AppendUint16(b, uint16(bodyLen))
	return append(b, body...)
}

// body4 and body6 build version 1 bodies from address bytes.
func body4(dst [4]byte, port uint16, src [4]byte) []byte {
	b := append([]byte{4}, dst[:]...)
	b = binary.BigEndian.AppendUint16(b, port)
	return append(b, src[:]...)
}

func body6(dst string, port uint16, src string) []byte {
	d, s := netip.MustParseAddr(dst).As16(), netip.MustParseAddr(src).As16()
	b := append([]byte{6}, d[:]...)
	b = binary.BigEndian.AppendUint16(b, port)
	return append(b, s[:]...)
}

// countingReader counts the bytes it hands out, to catch reads past the
// header.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestReadHeaderErrors(t *testing.T) {
	ok4 := body4([4]byte{10, 0, 0, 1}, 80, [4]byte{10, 0, 0, 2})
	ok6 := body6("fd00::1", 80, "fd00::2")
	for _, tc := range []struct {
		name string
		in   []byte
		want error
		// maxRead bounds how much ReadHeader may consume; 0 means the whole
		// framed header (8 + declared body length, or len(in)).
		maxRead int
	}{
		{name: "http request", in: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), want: tunnel.ErrBadMagic, maxRead: 4},
		{name: "tls client hello", in: []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, want: tunnel.ErrBadMagic, maxRead: 4},
		{name: "lowercase magic", in: append([]byte("tmsh"), header(2, 0, 11, ok4...)[4:]...), want: tunnel.ErrBadMagic, maxRead: 4},
		{name: "zeros", in: make([]byte, 64), want: tunnel.ErrBadMagic, maxRead: 4},
		{name: "version 0", in: header(0, 0, 11, ok4...), want: tunnel.ErrUnsupportedVersion, maxRead: 8},
		{name: "version 1 (unframed data phase)", in: header(1, 0, 11, ok4...), want: tunnel.ErrUnsupportedVersion, maxRead: 8},
		{name: "version 255", in: header(255, 0, 11, ok4...), want: tunnel.ErrUnsupportedVersion, maxRead: 8},
		{name: "oversized 513", in: header(2, 0, 513, make([]byte, 600)...), want: tunnel.ErrOversized, maxRead: 8},
		{name: "oversized 65535", in: header(2, 0, 0xffff), want: tunnel.ErrOversized, maxRead: 8},
		{name: "max body", in: header(2, 0, 512, make([]byte, 512)...), want: tunnel.ErrInvalidHeader},
		{name: "max body truncated", in: header(2, 0, 512, make([]byte, 511)...), want: tunnel.ErrTruncated},
		{name: "empty body", in: header(2, 0, 0), want: tunnel.ErrInvalidHeader},
		{name: "flags", in: header(2, 0x80, 11, ok4...), want: tunnel.ErrInvalidHeader},
		{name: "flag bit 0", in: header(2, 0x01, 35, ok6...), want: tunnel.ErrInvalidHeader},
		{name: "family 0", in: header(2, 0, 11, append([]byte{0}, ok4[1:]...)...), want: tunnel.ErrInvalidHeader},
		{name: "family 5", in: header(2, 0, 11, append([]byte{5}, ok4[1:]...)...), want: tunnel.ErrInvalidHeader},
		{name: "family 4 with v6 length", in: header(2, 0, 35, append([]byte{4}, ok6[1:]...)...), want: tunnel.ErrInvalidHeader},
		{name: "family 6 with v4 length", in: header(2, 0, 11, append([]byte{6}, ok4[1:]...)...), want: tunnel.ErrInvalidHeader},
		{name: "v4 body one long", in: header(2, 0, 12, append(ok4, 0)...), want: tunnel.ErrInvalidHeader},
		{name: "v4 body one short", in: header(2, 0, 10, ok4[:10]...), want: tunnel.ErrInvalidHeader},
		{name: "v4 zero port", in: header(2, 0, 11, body4([4]byte{10, 0, 0, 1}, 0, [4]byte{10, 0, 0, 2})...), want: tunnel.ErrInvalidHeader},
		{name: "v6 zero port", in: header(2, 0, 35, body6("fd00::1", 0, "fd00::2")...), want: tunnel.ErrInvalidHeader},
		{name: "v4 unspecified dst", in: header(2, 0, 11, body4([4]byte{}, 80, [4]byte{10, 0, 0, 2})...), want: tunnel.ErrInvalidHeader},
		{name: "v4 unspecified src", in: header(2, 0, 11, body4([4]byte{10, 0, 0, 1}, 80, [4]byte{})...), want: tunnel.ErrInvalidHeader},
		{name: "v4 multicast dst", in: header(2, 0, 11, body4([4]byte{224, 0, 0, 251}, 80, [4]byte{10, 0, 0, 2})...), want: tunnel.ErrInvalidHeader},
		{name: "v4 broadcast src", in: header(2, 0, 11, body4([4]byte{10, 0, 0, 1}, 80, [4]byte{255, 255, 255, 255})...), want: tunnel.ErrInvalidHeader},
		{name: "v4 loopback dst", in: header(2, 0, 11, body4([4]byte{127, 0, 0, 1}, 80, [4]byte{10, 0, 0, 2})...), want: tunnel.ErrInvalidHeader},
		{name: "v4 link-local dst", in: header(2, 0, 11, body4([4]byte{169, 254, 169, 254}, 80, [4]byte{10, 0, 0, 2})...), want: tunnel.ErrInvalidHeader},
		{name: "v6 unspecified dst", in: header(2, 0, 35, body6("::", 80, "fd00::2")...), want: tunnel.ErrInvalidHeader},
		{name: "v6 unspecified src", in: header(2, 0, 35, body6("fd00::1", 80, "::")...), want: tunnel.ErrInvalidHeader},
		{name: "v6 multicast src", in: header(2, 0, 35, body6("fd00::1", 80, "ff05::2")...), want: tunnel.ErrInvalidHeader},
		{name: "v6 loopback dst", in: header(2, 0, 35, body6("::1", 80, "fd00::2")...), want: tunnel.ErrInvalidHeader},
		{name: "v6 link-local src", in: header(2, 0, 35, body6("fd00::1", 80, "fe80::2")...), want: tunnel.ErrInvalidHeader},
		{name: "v4-mapped in family 6", in: header(2, 0, 35, body6("::ffff:10.0.0.1", 80, "::ffff:10.0.0.2")...), want: tunnel.ErrInvalidHeader},
		{name: "v6 with v4-mapped src", in: header(2, 0, 35, body6("fd00::1", 80, "::ffff:10.0.0.2")...), want: tunnel.ErrInvalidHeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Application data after the header must stay unread, except
			// where the test is that the stream ends inside the header.
			in := append([]byte{}, tc.in...)
			if tc.want != tunnel.ErrTruncated {
				in = append(in, "app data"...)
			}
			r := &countingReader{r: bytes.NewReader(in)}
			h, err := tunnel.ReadHeader(r)
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadHeader = %+v, %v; want %v", h, err, tc.want)
			}
			if h != (tunnel.Header{}) {
				t.Errorf("ReadHeader returned %+v with an error", h)
			}
			maxRead := tc.maxRead
			if maxRead == 0 {
				maxRead = len(tc.in)
			}
			if r.n > maxRead {
				t.Errorf("ReadHeader consumed %d bytes, want at most %d", r.n, maxRead)
			}
		})
	}
}

// TestReadHeaderTruncated cuts valid headers at every offset.
func TestReadHeaderTruncated(t *testing.T) {
	for _, h := range []tunnel.Header{hdr4, hdr6} {
		wire := mustMarshal(t, h)
		for i := 0; i < len(wire); i++ {
			_, err := tunnel.ReadHeader(bytes.NewReader(wire[:i]))
			if !errors.Is(err, tunnel.ErrTruncated) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("%s cut at %d/%d: %v, want ErrTruncated wrapping io.ErrUnexpectedEOF", h.Dst, i, len(wire), err)
			}
			var u tunnel.Header
			if err := u.UnmarshalBinary(wire[:i]); !errors.Is(err, tunnel.ErrTruncated) {
				t.Errorf("UnmarshalBinary %s cut at %d: %v, want ErrTruncated", h.Dst, i, err)
			}
		}
	}
}

// TestReadHeaderReaderError: errors other than the end of the stream (a TLS
// alert, a deadline) come back as they are, not as ErrTruncated.
func TestReadHeaderReaderError(t *testing.T) {
	errAlert := errors.New("remote error: tls: bad certificate")
	wire := mustMarshal(t, hdr4)
	for _, cut := range []int{0, 2, 4, 6, 8, 12} {
		r := io.MultiReader(bytes.NewReader(wire[:cut]), iotest.ErrReader(errAlert))
		_, err := tunnel.ReadHeader(r)
		if !errors.Is(err, errAlert) || errors.Is(err, tunnel.ErrTruncated) {
			t.Errorf("cut at %d: %v, want %v", cut, err, errAlert)
		}
	}
}
