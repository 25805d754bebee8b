package dialer

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
	"github.com/tunmesh/tunmesh/node/tunnel"
	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

type testCerts struct{ cfg *tls.Config }

func (c testCerts) ClientConfig(_, _ spiffe.ID) *tls.Config {
	cfg := c.cfg.Clone()
	// The dialer sets ServerName to the destination identity's name; this
	// test's certificate is for "tunnel.test", so it checks the chain only.
	cfg.InsecureSkipVerify = true
	return cfg
}

// slowServer is a mesh peer that answers the header after delay, as a
// destination agent does while its view learns the source pod.
func slowServer(t *testing.T, cfg *tls.Config, delay time.Duration) (netip.Addr, int) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() { // RoutineSlowServer: ends when the listener closes
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if _, err := tunnel.ReadHeader(c); err == nil {
				time.Sleep(delay)
				_ = tunnel.WriteReply(c, tunnel.ReasonNone)
			}
			c.Close()
		}
	}()
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	return ap.Addr(), int(ap.Port())
}

// TestReplyOutwaitsServerChecks: the client waits for the server's verdict
// longer than for the dial and handshake (the server may wait for its view
// to learn a Job pod's IP), and still gives up at ReplyTimeout.
func TestReplyOutwaitsServerChecks(t *testing.T) {
	client, server := tunneltest.TLSConfigs(t)
	for _, tc := range []struct {
		name   string
		delay  time.Duration
		reply  time.Duration
		wantOK bool
	}{
		{"verdict after the dial timeout, within the reply timeout", 400 * time.Millisecond, 3 * time.Second, true},
		{"verdict after the reply timeout", 1500 * time.Millisecond, 300 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			node, port := slowServer(t, server, tc.delay)
			d := &Dialer{Certs: testCerts{client}, MeshPort: port, ControlNamespace: "tunmesh", Timeout: 200 * time.Millisecond, ReplyTimeout: tc.reply}
			id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "default"}
			conn, err := d.Dial(context.Background(), Target{SrcID: id, Src: netip.MustParseAddrPort("10.244.1.2:40000"),
				Dst: netip.MustParseAddrPort("10.244.2.3:" + strconv.Itoa(8080)), DstID: id, DstNode: node})
			if (err == nil) != tc.wantOK {
				t.Fatalf("Dial err = %v, want ok %v", err, tc.wantOK)
			}
			if conn != nil {
				conn.Close()
			}
		})
	}
}
