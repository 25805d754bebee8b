package dialer

import (
	"crypto/tls"
	"testing"

	"github.com/tunmesh/tunmesh/node/tunnel/tunneltest"
)

// BenchmarkHandshake measures the agent-to-agent mTLS handshake (TLS 1.3,
// ECDSA P-256 certificates both ways, loopback TCP, both ends in this
// process: ns/op is the wall time of one connection set-up, and the CPU of
// both agents) for the key exchanges Go offers, with and without session
// resumption (a resumed TLS 1.3 handshake skips both certificates and
// their signatures; the key exchange still runs).
//
//	go test -run '^$' -bench Handshake -benchtime 2s ./node/dialer/
func BenchmarkHandshake(b *testing.B) {
	for _, kx := range []struct {
		name  string
		curve tls.CurveID
	}{{"X25519MLKEM768", tls.X25519MLKEM768}, {"X25519", tls.X25519}} {
		for _, resume := range []bool{false, true} {
			name := kx.name + "/full"
			if resume {
				name = kx.name + "/resumed"
			}
			b.Run(name, func(b *testing.B) {
				ccfg, scfg := tunneltest.TLSConfigs(b)
				ccfg.CurvePreferences = []tls.CurveID{kx.curve}
				scfg.CurvePreferences = []tls.CurveID{kx.curve}
				if resume {
					ccfg.ClientSessionCache = tls.NewLRUClientSessionCache(16)
				}
				ln, err := tls.Listen("tcp", "127.0.0.1:0", scfg)
				if err != nil {
					b.Fatal(err)
				}
				defer ln.Close()
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						go func() {
							defer c.Close()
							if err := c.(*tls.Conn).Handshake(); err != nil {
								return
							}
							c.Write([]byte{1}) // the server's first flight done; lets the client read tickets
						}()
					}
				}()
				dial := func() bool {
					c, err := tls.Dial("tcp", ln.Addr().String(), ccfg)
					if err != nil {
						b.Fatal(err)
					}
					defer c.Close()
					if _, err := c.Read(make([]byte, 1)); err != nil {
						b.Fatal(err)
					}
					return c.ConnectionState().DidResume
				}
				if resume {
					dial() // the first one is full and leaves a ticket
				}
				b.ResetTimer()
				resumed := 0
				for range b.N {
					if dial() {
						resumed++
					}
				}
				b.StopTimer()
				if resume && resumed < b.N*9/10 {
					b.Fatalf("only %d of %d handshakes resumed", resumed, b.N)
				}
				if !resume && resumed != 0 {
					b.Fatalf("%d handshakes resumed without a session cache", resumed)
				}
			})
		}
	}
}
