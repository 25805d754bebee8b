package policy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// serveUDPEcho answers every datagram to port inside ref's pod with the
// same bytes, until the test ends.
func (m *model) serveUDPEcho(t *testing.T, ref podRef, port int) {
	t.Helper()
	var pc net.PacketConn
	if err := namedns.Do(m.c.PodNetns(m.pods[ref]), func() error {
		var err error
		pc, err = net.ListenPacket("udp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatalf("listen udp %d in %s: %v", port, ref, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // ends when pc closes (cleanup)
		defer wg.Done()
		b := make([]byte, 512)
		for {
			n, addr, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(b[:n], addr)
		}
	}()
	t.Cleanup(func() { pc.Close(); wg.Wait() })
}

// probeUDP reports whether a datagram from `from` to to:port is answered
// (each try from a new socket, so a new flow for the agent).
func (m *model) probeUDP(from, to podRef, port int) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	dst := net.JoinHostPort(m.pods[to].Status.PodIP, fmt.Sprint(port))
	conn, err := namedns.DialContext(ctx, m.c.PodNetns(m.pods[from]), "udp", dst)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(probeTimeout))
	msg := []byte("udp-egress " + from.String())
	b := make([]byte, 512)
	// A few sends: a datagram may be lost for reasons of its own.
	for range 3 {
		if _, err := conn.Write(msg); err != nil {
			return false, err
		}
		_ = conn.SetReadDeadline(time.Now().Add(probeTimeout / 3))
		n, err := conn.Read(b)
		if err == nil && string(b[:n]) == string(msg) {
			return true, nil
		}
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			return false, err
		}
	}
	return false, nil
}

// udpCase is one expected UDP reachability.
type udpCase struct {
	from, to podRef
	port     int
	want     bool
}

// checkUDP waits (policy propagation) until every case is as expected.
func (m *model) checkUDP(t *testing.T, cases []udpCase, timeout time.Duration) {
	t.Helper()
	e2eenv.WaitFor(t, timeout, "udp reachability", func() error {
		var errs []error
		for _, c := range cases {
			got, err := m.probeUDP(c.from, c.to, c.port)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s -> %s udp/%d: %w", c.from, c.to, c.port, err))
			} else if got != c.want {
				errs = append(errs, fmt.Errorf("%s -> %s udp/%d: answered %v, want %v", c.from, c.to, c.port, got, c.want))
			}
		}
		return errors.Join(errs...)
	})
}

// testUDPEgress: non-TCP packets of meshed pods leave through the agent's
// host TUN, where a CNI's egress enforcement on the pod's veth never sees
// them, so the agent applies the source's egress policy to them: with
// egress default-deny in x a meshed pod's UDP to a non-meshed pod is
// dropped, and a policy allowing UDP 53 to the DNS-like pod lets exactly
// that through.
func testUDPEgress(t *testing.T, m *model) {
	xa, ya := podRef{"x", "a"}, podRef{"y", "a"}
	m.serveUDPEcho(t, m.plain, 53)
	m.serveUDPEcho(t, m.plain, 5353)
	all := func(want bool) []udpCase {
		return []udpCase{{xa, m.plain, 53, want}, {xa, m.plain, 5353, want}, {ya, m.plain, 53, true}, {ya, m.plain, 5353, true}}
	}
	m.checkUDP(t, all(true), propagation)

	before := agentMetric(t, m.c, "tunmesh_policy_denials_total", `policy_name="deny-egress-udp"`)
	defer m.apply(t, np("x", "deny-egress-udp", sel(), networkingv1.PolicyTypeEgress))()
	m.checkUDP(t, all(false), propagation)
	if after := agentMetric(t, m.c, "tunmesh_policy_denials_total", `policy_name="deny-egress-udp"`); after <= before {
		t.Errorf("tunmesh_policy_denials_total for deny-egress-udp %v -> %v: want the UDP denials counted", before, after)
	}

	dns := withEgress(np("x", "allow-dns-to-p", sel(), networkingv1.PolicyTypeEgress),
		[]networkingv1.NetworkPolicyPort{{Protocol: ptr(corev1.ProtocolUDP), Port: ptr(intstr.FromInt32(53))}},
		peer(sel("ns", "p"), nil))
	defer m.apply(t, dns)()
	m.checkUDP(t, []udpCase{{xa, m.plain, 53, true}, {xa, m.plain, 5353, false}, {ya, m.plain, 5353, true}}, propagation)
}
