package mux_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
)

// FuzzReadFrame: the frame parser never panics, never reads past the
// frame it declared, and every frame it accepts is one of the defined
// types within its bounds.
func FuzzReadFrame(f *testing.F) {
	f.Add(frame(mux.FrameOpen, 0, 1, hdr))
	f.Add(frame(mux.FrameData, 0, 1, []byte("data")))
	f.Add(frame(mux.FrameEnd, 0, 1, nil))
	f.Add(frame(mux.FrameReset, 0, 3, nil))
	f.Add(frame(mux.FrameWindow, 0, 0, win(1<<20)))
	f.Add(frame(mux.FrameReply, 0, 1, []byte{tunnel.ReplyRefused, 4}))
	f.Add([]byte{0x09, 0, 0, 0, 0, 0, 0, 1})
	f.Add([]byte{0, 0, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		fr, payload, err := mux.ReadFrame(r, nil)
		if err != nil {
			if len(data) >= mux.HeaderLen && !errors.Is(err, mux.ErrProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("error %v is neither a protocol error nor a truncation", err)
			}
			return
		}
		if consumed := len(data) - r.Len(); consumed != mux.HeaderLen+fr.Len || len(payload) != fr.Len {
			t.Fatalf("consumed %d bytes for a frame of %d", consumed, fr.Len)
		}
		if fr.Len > mux.MaxPayload || fr.Type > mux.FrameReply {
			t.Fatalf("accepted %+v", fr)
		}
		if data[1] != 0 {
			t.Fatalf("accepted flags %#x", data[1])
		}
	})
}

// FuzzServerSession feeds arbitrary bytes to a server session, as a
// hostile client after the TLS handshake would: the session never panics
// and either stays up or ends with an error, closing the connection.
func FuzzServerSession(f *testing.F) {
	f.Add(bytes.Join([][]byte{frame(mux.FrameOpen, 0, 1, hdr), frame(mux.FrameData, 0, 1, []byte("x")), frame(mux.FrameEnd, 0, 1, nil)}, nil))
	f.Add(bytes.Join([][]byte{frame(mux.FrameOpen, 0, 1, hdr), frame(mux.FrameReset, 0, 1, nil), frame(mux.FrameData, 0, 1, []byte("late"))}, nil))
	f.Add(bytes.Join([][]byte{frame(mux.FrameOpen, 0, 3, hdr), frame(mux.FrameOpen, 0, 1, hdr)}, nil))
	f.Add(frame(mux.FrameWindow, 0, 0, win(1<<31-1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		s := mux.Server(b, mux.Config{MaxStreams: 4}, func(st *mux.Stream) {
			if len(st.Payload())%2 == 0 {
				st.Refuse(tunnel.ReasonPolicy)
				return
			}
			st.Accept()
			io.Copy(io.Discard, st)
			st.Close()
		})
		go io.Copy(io.Discard, a)
		a.SetWriteDeadline(time.Now().Add(time.Second))
		a.Write(data)
		a.Close()
		select {
		case <-s.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("session not ended after its connection closed")
		}
		if s.Err() == nil {
			t.Fatal("ended session without an error")
		}
		s.Wait()
	})
}
