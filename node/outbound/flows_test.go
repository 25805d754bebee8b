package outbound

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
	"github.com/tunmesh/tunmesh/node/tunnel/mux"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// TestAccounting: a flow left in plaintext is recorded with why (edges'
// MSG), and a meshed one with both identities, its HTTP/1 exchange and its
// end, as tap shows them.
func TestAccounting(t *testing.T) {
	d, _ := fixture()
	certs := &fakeCerts{}
	certs.ready.Store(true)
	a, b := tunneltest.Pipe()
	client := mux.Client(a, mux.Config{})
	server := mux.Server(b, mux.Config{}, func(st *mux.Stream) {
		if st.Accept() != nil {
			return
		}
		// The request may arrive in more than one read (the Open frame
		// carries only the first bytes the pod wrote): read up to the
		// end of its headers.
		var req []byte
		buf := make([]byte, 512)
		for !strings.Contains(string(req), "\r\n\r\n") {
			n, err := st.Read(buf)
			req = append(req, buf[:n]...)
			if err != nil {
				break
			}
		}
		if strings.HasPrefix(string(req), "GET /hi HTTP/1.1") {
			_, _ = st.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
		}
		// End our side and wait for the client's end: closing a stream
		// the peer has not finished resets it, and a reset discards the
		// response the pod has not read yet.
		_ = st.CloseWrite()
		_, _ = io.Copy(io.Discard, st)
		st.Close()
	})
	t.Cleanup(func() { client.Close(); server.Close(); client.Wait(); server.Wait() })
	flows := flowlog.New(nil, nil, flowlog.Options{HTTP: true})
	sub := flows.Subscribe(flowlog.Filter{}, 64)
	defer sub.Close()
	h, err := NewHandler(d, streamDialer{client}, noTrack{}, certs, Options{Flows: flows}, nodemetrics.ForTest(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}

	if got := h.HandleFlow(fl(1, netip.AddrPortFrom(skipIP, 5432))); got != netstack.Passthrough {
		t.Fatalf("skipped port: %s", got)
	}
	f := fl(1, netip.AddrPortFrom(meshedIP, 8080))
	if got := h.HandleFlow(f); got != netstack.Terminate {
		t.Fatalf("meshed: %s", got)
	}
	agentSide, pod := tunneltest.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeConn(context.Background(), &podConn{Conn: agentSide}, f)
	}()
	_, _ = pod.Write([]byte("GET /hi HTTP/1.1\r\nHost: web\r\n\r\n"))
	_ = pod.CloseWrite()
	_, _ = io.ReadAll(pod)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not end")
	}

	var lines []string
	for len(sub.C()) > 0 {
		lines = append(lines, (<-sub.C()).String())
	}
	all := strings.Join(lines, "\n")
	for _, want := range []string{
		"tcp open id=1 proxy=out src=" + f.Src.String() + " dst=10.244.2.5:5432 tls=skipped_port",
		"tcp open id=2 proxy=out src=" + f.Src.String() + " dst=10.244.2.3:8080 tls=true client_id=spiffe://",
		"req id=2 proxy=out", ":method=GET :authority=web :path=/hi",
		"rsp id=2 proxy=out", ":status=200",
		"end id=2", "response-length=2B",
		"tcp close id=2",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("tap lacks %q:\n%s", want, all)
		}
	}
	edges := flows.Edges()
	if len(edges) != 2 || edges[0].TLS != "skipped_port" && edges[1].TLS != "skipped_port" {
		t.Fatalf("edges %+v", edges)
	}
}
