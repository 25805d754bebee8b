package inbound

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/node/dialer"
	"github.com/tunmesh/tunmesh/node/flowlog"
)

// TestInboundAccounting: a delivered stream is recorded on the server's
// side with both identities, the tunnel's peer and its bytes, and an
// HTTP/1 exchange through it is reported.
func TestInboundAccounting(t *testing.T) {
	flows := flowlog.New(nil, nil, flowlog.Options{HTTP: true})
	sub := flows.Subscribe(flowlog.Filter{}, 64)
	defer sub.Close()
	_, _, port, certs := serveVersions(t, Config{SourceWait: 100 * time.Millisecond, Flows: flows})
	v3 := &dialer.Dialer{Certs: certs, MeshPort: port, ControlNamespace: "tunmesh"}
	t.Cleanup(v3.Close)
	c, err := v3.Dial(t.Context(), target(srcIP))
	if err != nil {
		t.Fatal(err)
	}
	// The echo pod sends the request back: the parser sees it as the
	// server's bytes, which are not a response, and gives up; the
	// connection itself is still accounted.
	echoOnce(t, c, "GET / HTTP/1.1\r\n\r\n")
	deadline := time.Now().Add(5 * time.Second)
	var lines []string
	for time.Now().Before(deadline) && !strings.Contains(strings.Join(lines, "\n"), "tcp close") {
		select {
		case e := <-sub.C():
			lines = append(lines, e.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	all := strings.Join(lines, "\n")
	for _, want := range []string{
		"tcp open id=1 proxy=in", "dst=" + dstIP.String() + ":8080 tls=true client_id=spiffe://cluster.local/ns/prod/sa/default server_id=spiffe://cluster.local/ns/prod/sa/server",
		"req id=1 proxy=in", ":method=GET :authority= :path=/",
		"tcp close id=1", "bytes_client=18 bytes_server=18 end=clean",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("events lack %q:\n%s", want, all)
		}
	}
	conns := flows.Conns()
	if len(conns) != 1 || conns[0].Peer != loopback || conns[0].Src.Addr() != srcIP {
		t.Fatalf("accounted %+v", conns)
	}
	// The carrying connection's 4-tuple, from this (the server's) side.
	client := flowlog.TunnelOf(c)
	if want := [2]netip.AddrPort{client[1], client[0]}; conns[0].Tunnel != want || want[0].Port() != uint16(port) {
		t.Fatalf("tunnel %v, want %v (server port %d)", conns[0].Tunnel, want, port)
	}
}
