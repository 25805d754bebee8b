package tunnel_test

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/tunmesh/tunmesh/node/tunnel"
)

func TestReplyRoundTrip(t *testing.T) {
	for _, reason := range []tunnel.Reason{
		tunnel.ReasonNone,
		tunnel.ReasonUnknownDestination,
		tunnel.ReasonSourceNotOwned,
		tunnel.ReasonDialFailed,
		tunnel.ReasonPolicy,
		tunnel.ReasonBadHeader,
		200, // from a newer server
	} {
		t.Run(reason.String(), func(t *testing.T) {
			var buf bytes.Buffer
			if err := tunnel.WriteReply(&buf, reason); err != nil {
				t.Fatalf("WriteReply: %v", err)
			}
			wantLen := 2
			if reason == tunnel.ReasonNone {
				wantLen = 1
			}
			if buf.Len() != wantLen {
				t.Fatalf("reply is %d bytes (%x), want %d", buf.Len(), buf.Bytes(), wantLen)
			}
			buf.WriteString("app data")
			err := tunnel.ReadReply(iotest.OneByteReader(&buf))
			if reason == tunnel.ReasonNone {
				if err != nil {
					t.Fatalf("ReadReply = %v, want nil", err)
				}
			} else {
				var refused *tunnel.RefusedError
				if !errors.As(err, &refused) || refused.Reason != reason {
					t.Fatalf("ReadReply = %v, want RefusedError{%v}", err, reason)
				}
			}
			if buf.String() != "app data" {
				t.Errorf("left on the stream %q: ReadReply read past the reply", buf.String())
			}
		})
	}
}

func TestReplyWire(t *testing.T) {
	var buf bytes.Buffer
	tunnel.WriteReply(&buf, tunnel.ReasonNone)
	tunnel.WriteReply(&buf, tunnel.ReasonPolicy)
	if want := []byte{0x01, 0x02, 0x04}; !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("wire = %x, want %x", buf.Bytes(), want)
	}
}

func TestReadReplyErrors(t *testing.T) {
	errReset := errors.New("connection reset by peer")
	for _, tc := range []struct {
		name string
		r    io.Reader
		want error
	}{
		{"empty", bytes.NewReader(nil), tunnel.ErrTruncated},
		{"refused without reason", bytes.NewReader([]byte{tunnel.ReplyRefused}), tunnel.ErrTruncated},
		{"status 0", bytes.NewReader([]byte{0, 0}), tunnel.ErrInvalidReply},
		{"http response", bytes.NewReader([]byte("HTTP/1.1 400 Bad Request")), tunnel.ErrInvalidReply},
		{"refused reason 0", bytes.NewReader([]byte{tunnel.ReplyRefused, 0}), tunnel.ErrInvalidReply},
		{"reader error", iotest.ErrReader(errReset), errReset},
		{"reader error after status", io.MultiReader(bytes.NewReader([]byte{tunnel.ReplyRefused}), iotest.ErrReader(errReset)), errReset},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tunnel.ReadReply(tc.r)
			if !errors.Is(err, tc.want) {
				t.Errorf("ReadReply = %v, want %v", err, tc.want)
			}
			var refused *tunnel.RefusedError
			if errors.As(err, &refused) {
				t.Errorf("ReadReply = %v, a refusal", err)
			}
		})
	}
	if err := tunnel.ReadReply(bytes.NewReader(nil)); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("empty reply: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestReasonString(t *testing.T) {
	for r, want := range map[tunnel.Reason]string{
		tunnel.ReasonUnknownDestination: "unknown destination",
		tunnel.ReasonSourceNotOwned:     "source not owned by client identity",
		tunnel.ReasonDialFailed:         "dial failed",
		tunnel.ReasonPolicy:             "denied by policy",
		tunnel.ReasonBadHeader:          "bad header",
		tunnel.ReasonBusy:               "busy",
		77:                              "reason(77)",
	} {
		if got := r.String(); got != want {
			t.Errorf("Reason(%d).String() = %q, want %q", r, got, want)
		}
	}
	err := error(&tunnel.RefusedError{Reason: tunnel.ReasonDialFailed})
	if got, want := err.Error(), "tunnel refused: dial failed"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestWriteReplyError(t *testing.T) {
	errBoom := errors.New("boom")
	if err := tunnel.WriteReply(errWriter{errBoom}, tunnel.ReasonPolicy); !errors.Is(err, errBoom) {
		t.Errorf("WriteReply = %v, want %v", err, errBoom)
	}
}
