package main

import (
	"bufio"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// The wireguard-go reference path (--transport wireguard): two opted-out
// pods, each running wireguard-go (built from the module tunmesh uses,
// bin/wireguard-go) with a kernel TUN device in the pod, configured
// through its UAPI socket; the tools dial the server's inner address.
//
// The same pods also carry an HAProxy mTLS sidecar pair whose connections
// run through the wireguard-go pair (the client sidecar dials the server's
// inner address): the sidecar model over WireGuard, the path that does
// the same work as tunmesh over WireGuard.
const (
	wgPort      = 51821
	wgMTU       = 1420
	wgClientDev = "wgbc0"
	wgServerDev = "wgbs0"
	wgClientIP  = "10.99.0.1"
	wgServerIP  = "10.99.0.2"
	wgUAPIDir   = "/var/run/wireguard" // wireguard-go's socket directory
)

// wireguardGoSpecs are the two pods, each with its wireguard-go and an
// HAProxy sidecar (configs serverCfg and clientCfg: files of their own,
// so that haproxyPids tells this pair from the plain one).
func wireguardGoSpecs(serverCfg, clientCfg string) []podSpec {
	return []podSpec{
		{name: "wg-server", node: "node-2", sa: "bench-server", containers: append(serverApps(""),
			[]string{"wireguard-go", "-f", wgServerDev}, []string{"haproxy", "-db", "-f", serverCfg})},
		{name: "wg-client", node: "node-1", sa: "bench-client", containers: [][]string{sleeper,
			{"wireguard-go", "-f", wgClientDev}, {"haproxy", "-db", "-f", clientCfg}}},
	}
}

// setupWireGuardGo gives both devices keys, peers and addresses.
func setupWireGuardGo(ctx context.Context, c *cluster, client, server *corev1.Pod) error {
	ck, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	sk, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	for _, d := range []struct {
		pod        *corev1.Pod
		dev, ip    string
		key        *ecdh.PrivateKey
		peer       *ecdh.PublicKey
		peerIP     string
		peerInner  string
		endpointOK bool
	}{
		{client, wgClientDev, wgClientIP, ck, sk.PublicKey(), server.Status.PodIP, wgServerIP, true},
		{server, wgServerDev, wgServerIP, sk, ck.PublicKey(), client.Status.PodIP, wgClientIP, true},
	} {
		conf := fmt.Sprintf("private_key=%s\nlisten_port=%d\nreplace_peers=true\npublic_key=%s\nendpoint=%s\nallowed_ip=%s/32\n",
			hex.EncodeToString(d.key.Bytes()), wgPort, hex.EncodeToString(d.peer.Bytes()), net.JoinHostPort(d.peerIP, strconv.Itoa(wgPort)), d.peerInner)
		if err := uapiSet(ctx, d.dev, conf); err != nil {
			return fmt.Errorf("configure %s in %s: %w", d.dev, d.pod.Name, err)
		}
		for _, argv := range [][]string{
			{"ip", "addr", "replace", d.ip + "/24", "dev", d.dev},
			{"ip", "link", "set", "dev", d.dev, "mtu", strconv.Itoa(wgMTU), "up"},
		} {
			if out, err := c.inPod(ctx, d.pod, 10*time.Second, argv...); err != nil {
				return fmt.Errorf("%s in %s: %w: %s", strings.Join(argv, " "), d.pod.Name, err, out)
			}
		}
	}
	return nil
}

// uapiSet sends a UAPI set operation to wireguard-go's socket for dev,
// waiting for the socket to appear (the process is starting).
func uapiSet(ctx context.Context, dev, conf string) error {
	path := filepath.Join(wgUAPIDir, dev+".sock")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no UAPI socket %s", path)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("set=1\n" + conf + "\n")); err != nil {
		return err
	}
	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break
		}
		if strings.HasPrefix(line, "errno=") && line != "errno=0" {
			return fmt.Errorf("wireguard-go: %s", line)
		}
	}
	return sc.Err()
}

// wireguardGoPids are the two wireguard-go processes of the path.
func wireguardGoPids() ([]int, error) {
	pids := procs(func(argv []string) bool {
		return filepath.Base(argv[0]) == "wireguard-go" && (slices.Contains(argv, wgClientDev) || slices.Contains(argv, wgServerDev))
	})
	if len(pids) != 2 {
		return pids, fmt.Errorf("found %d wireguard-go processes, want 2", len(pids))
	}
	return pids, nil
}
