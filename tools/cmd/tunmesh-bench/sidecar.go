package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The HAProxy pair stands for a sidecar mesh: each opted-out pod gets an
// HAProxy container; the client's sidecar listens on localhost and opens
// mTLS (TLS 1.3, ECDSA P-256, the peer verified both ways) to the server's
// sidecar, which forwards to the app on localhost. It runs in TCP mode, as
// tunmesh is an L4 mesh: every client connection is its own TLS connection
// (HAProxy resumes TLS sessions to the server, as sidecars do).

// Ports of the apps (on localhost in the HAProxy server pod, on every
// address in the other server pods) and of the server sidecar's mTLS
// frontends.
const (
	iperfPort    = 5201
	sockperfPort = 11111
	httpPort     = 8080
	mtlsOffset   = 10000 // server sidecar listens on app port + offset
	serverName   = "bench-server.tunmesh-bench.svc"
)

var appPorts = []int{iperfPort, sockperfPort, httpPort}

// sidecarPKI writes a CA and a server and a client certificate (ECDSA
// P-256) as HAProxy wants them: ca.crt, server.pem and client.pem (leaf
// certificate followed by its PKCS#8 key).
func sidecarPKI(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate CA key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tunmesh-bench sidecar CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("parse CA certificate: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return err
	}
	for i, leaf := range []struct {
		file  string
		cn    string
		dns   []string
		usage x509.ExtKeyUsage
	}{
		{"server.pem", serverName, []string{serverName}, x509.ExtKeyUsageServerAuth},
		{"client.pem", "bench-client.tunmesh-bench", nil, x509.ExtKeyUsageClientAuth},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate %s key: %w", leaf.file, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)),
			Subject:      pkix.Name{CommonName: leaf.cn},
			DNSNames:     leaf.dns,
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{leaf.usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("create %s: %w", leaf.file, err)
		}
		pk, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return fmt.Errorf("marshal %s key: %w", leaf.file, err)
		}
		out := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk})...)
		if err := os.WriteFile(filepath.Join(dir, leaf.file), out, 0o600); err != nil {
			return err
		}
	}
	return nil
}

const haproxyGlobal = `global
	# no chroot, user or daemon: the stand-in kubelet runs it as a container
	ssl-default-bind-options ssl-min-ver TLSv1.3
	ssl-default-server-options ssl-min-ver TLSv1.3
	maxconn 4096 # the stand-in kubelet gives containers 20000 fds; HAProxy needs 2 per connection

defaults
	mode tcp
	timeout connect 5s
	timeout client 120s
	timeout server 120s
`

// serverSidecarConfig terminates mTLS on every address at app port +
// mtlsOffset, requires a client certificate from the CA, and forwards to
// the app on localhost.
func serverSidecarConfig(dir string) string {
	var b strings.Builder
	b.WriteString(haproxyGlobal)
	for _, p := range appPorts {
		fmt.Fprintf(&b, "\nlisten app%d\n\tbind :%d ssl crt %s ca-file %s verify required\n\tserver app 127.0.0.1:%d\n",
			p, p+mtlsOffset, filepath.Join(dir, "server.pem"), filepath.Join(dir, "ca.crt"), p)
	}
	return b.String()
}

// clientSidecarConfig listens on localhost at the app ports and opens
// mTLS to the server sidecar, verifying its certificate and name.
func clientSidecarConfig(dir, serverIP string) string {
	var b strings.Builder
	b.WriteString(haproxyGlobal)
	for _, p := range appPorts {
		fmt.Fprintf(&b, "\nlisten app%d\n\tbind 127.0.0.1:%d\n\tserver peer %s ssl crt %s ca-file %s verify required verifyhost %s sni str(%s)\n",
			p, p, net.JoinHostPort(serverIP, strconv.Itoa(p+mtlsOffset)),
			filepath.Join(dir, "client.pem"), filepath.Join(dir, "ca.crt"), serverName, serverName)
	}
	return b.String()
}
