package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		bad  string // substring of the error; "" = valid
	}{
		{args: nil},
		{args: []string{"--mode", "memory", "--pods", "8", "--idle-conns", "10"}},
		{args: []string{"--mode", "fast"}, bad: "--mode"},
		{args: []string{"--reps", "0"}, bad: ">= 1"},
		{args: []string{"--duration", "500ms"}, bad: ">= 1s"},
		{args: []string{"--pods", "10"}, bad: "multiple of 4"},
		{args: []string{"--idle-conns", "3"}, bad: "even"},
		{args: []string{"--name", ""}, bad: "--name"},
		{args: []string{"extra"}, bad: "unexpected"},
	} {
		cfg, err := parseFlags(tc.args, io.Discard)
		if tc.bad == "" {
			if err != nil {
				t.Errorf("%q: %v", tc.args, err)
			} else if cfg.Name != "bench" || cfg.Ctl == "" || cfg.BootLock == "" {
				t.Errorf("%q: defaults not set: %+v", tc.args, cfg)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.bad) {
			t.Errorf("%q: err = %v, want one about %q", tc.args, err, tc.bad)
		}
	}
}

// The sidecars' certificates chain to the CA with the right uses: TLS 1.3
// mTLS between them works in Go, verifying both ways, with the name the
// client sidecar checks.
func TestSidecarPKI(t *testing.T) {
	dir := t.TempDir()
	if err := sidecarPKI(dir); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("no CA certificate")
	}
	load := func(name string) tls.Certificate {
		p := filepath.Join(dir, name)
		c, err := tls.LoadX509KeyPair(p, p)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := c.Leaf.PublicKey.(*ecdsa.PublicKey); !ok || c.Leaf.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P256() {
			t.Fatalf("%s: not an ECDSA key", name)
		}
		return c
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{load("server.pem")},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		done <- c.(*tls.Conn).Handshake()
	}()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), &tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: serverName, Certificates: []tls.Certificate{load("client.pem")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if v := conn.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Errorf("TLS version %x", v)
	}
	conn.Close()
	if err := <-done; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
}

// HAProxy accepts both sidecar configurations (haproxy -c), when installed.
func TestSidecarConfigsValid(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed (make deps)")
	}
	dir := t.TempDir()
	if err := sidecarPKI(dir); err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]string{
		"server": serverSidecarConfig(dir),
		"client": clientSidecarConfig(dir, "10.244.2.7"),
	} {
		p := filepath.Join(dir, name+".cfg")
		if err := os.WriteFile(p, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bin, "-c", "-f", p).CombinedOutput(); err != nil {
			t.Errorf("%s config rejected: %v\n%s\n%s", name, err, out, cfg)
		}
	}
	for _, want := range []string{"verify required", "ssl-min-ver TLSv1.3", "verifyhost " + serverName, "10.244.2.7:15201"} {
		if !strings.Contains(serverSidecarConfig(dir)+clientSidecarConfig(dir, "10.244.2.7"), want) {
			t.Errorf("configs lack %q", want)
		}
	}
}

func TestRotate(t *testing.T) {
	paths := []string{"kernel", "haproxy", "tunmesh"}
	for rep, want := range [][]string{
		{"kernel", "haproxy", "tunmesh"},
		{"haproxy", "tunmesh", "kernel"},
		{"tunmesh", "kernel", "haproxy"},
		{"kernel", "haproxy", "tunmesh"},
	} {
		if got := rotate(paths, rep); !slices.Equal(got, want) {
			t.Errorf("rep %d: %v, want %v", rep, got, want)
		}
	}
	if !slices.Equal(paths, []string{"kernel", "haproxy", "tunmesh"}) {
		t.Error("rotate changed its input")
	}
	if rotate([]string(nil), 3) != nil {
		t.Error("rotate of nothing")
	}
}
