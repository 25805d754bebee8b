package wireguard

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestOverlayAddr(t *testing.T) {
	o, err := OverlayAddr(netip.MustParseAddr("10.0.0.2"))
	if err != nil || o.String() != "fd74:6d77:67::a00:2" {
		t.Fatalf("overlay %s %v", o, err)
	}
	n, ok := NodeOfOverlay(o)
	if !ok || n != netip.MustParseAddr("10.0.0.2") {
		t.Fatalf("back: %s %v", n, ok)
	}
	if _, err := OverlayAddr(netip.MustParseAddr("fd00::1")); !errors.Is(err, ErrNoOverlay) {
		t.Fatalf("IPv6 node: %v", err)
	}
	if _, ok := NodeOfOverlay(netip.MustParseAddr("fd00::a00:2")); ok {
		t.Fatal("outside the prefix mapped")
	}
}

func testPublished(t testing.TB, node string) Published {
	ip := netip.MustParseAddr(node)
	o, _ := OverlayAddr(ip)
	return Published{PublicKey: mustKey(t).PublicKey(), Endpoint: netip.AddrPortFrom(ip, 51820), Overlay: o, EncryptAll: true}
}

func TestParsePublished(t *testing.T) {
	p := testPublished(t, "10.0.0.2")
	got, err := ParsePublished(p.Annotations())
	if err != nil || got != p {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	if _, err := ParsePublished(map[string]string{"other": "x"}); !errors.Is(err, ErrNotPublished) {
		t.Fatalf("no annotations: %v", err)
	}
	other, _ := OverlayAddr(netip.MustParseAddr("10.0.0.3"))
	for name, mut := range map[string]func(map[string]string){
		"bad key":           func(a map[string]string) { a[AnnotationPublicKey] = "xx" },
		"no endpoint":       func(a map[string]string) { delete(a, AnnotationEndpoint) },
		"endpoint port 0":   func(a map[string]string) { a[AnnotationEndpoint] = "10.0.0.2:0" },
		"endpoint no port":  func(a map[string]string) { a[AnnotationEndpoint] = "10.0.0.2" },
		"no overlay":        func(a map[string]string) { delete(a, AnnotationOverlay) },
		"another's overlay": func(a map[string]string) { a[AnnotationOverlay] = other.String() },
		"ipv6 endpoint":     func(a map[string]string) { a[AnnotationEndpoint] = "[fd00::1]:51820" },
	} {
		a := p.Annotations()
		mut(a)
		if _, err := ParsePublished(a); err == nil || errors.Is(err, ErrNotPublished) {
			t.Errorf("%s: err %v, want a refusal", name, err)
		}
	}
	patch, err := p.MergePatch()
	if err != nil || !strings.Contains(string(patch), `"wireguard.tunmesh.io/public-key":"`+p.PublicKey.String()) {
		t.Fatalf("merge patch %s %v", patch, err)
	}
}

func testNode(name, ip string, cidrs []string, ann map[string]string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann},
		Spec:       corev1.NodeSpec{PodCIDRs: cidrs},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: name}, {Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

func TestPeerFromNode(t *testing.T) {
	p := testPublished(t, "10.0.0.2")
	peer, ok := PeerFromNode(testNode("b", "10.0.0.2", []string{"10.244.1.0/24"}, p.Annotations()))
	if !ok || peer.Err != nil || peer.Published != p || peer.NodeIP != netip.MustParseAddr("10.0.0.2") || len(peer.PodCIDRs) != 1 {
		t.Fatalf("peer %+v ok %v", peer, ok)
	}
	// Published for another address than its InternalIP: refused.
	peer, ok = PeerFromNode(testNode("b", "10.0.0.9", nil, p.Annotations()))
	if !ok || peer.Err == nil || !peer.HasKey() {
		t.Fatalf("mismatched endpoint: %+v", peer)
	}
	// No key: a peer reached on the underlay.
	peer, ok = PeerFromNode(testNode("c", "10.0.0.3", nil, nil))
	if !ok || peer.HasKey() {
		t.Fatalf("no key: %+v", peer)
	}
	// No InternalIP: ignored.
	n := testNode("d", "10.0.0.4", nil, nil)
	n.Status.Addresses = n.Status.Addresses[:1]
	if _, ok := PeerFromNode(n); ok {
		t.Fatal("node without InternalIP taken")
	}
}

func FuzzParsePublished(f *testing.F) {
	p := testPublished(f, "10.0.0.2")
	a := p.Annotations()
	f.Add(a[AnnotationPublicKey], a[AnnotationEndpoint], a[AnnotationOverlay])
	f.Add("", "", "")
	f.Add(a[AnnotationPublicKey], "[::ffff:10.0.0.2]:51820", a[AnnotationOverlay])
	f.Fuzz(func(t *testing.T, key, endpoint, overlay string) {
		got, err := ParsePublished(map[string]string{AnnotationPublicKey: key, AnnotationEndpoint: endpoint, AnnotationOverlay: overlay})
		if err != nil {
			return
		}
		// Whatever parses is self-consistent and round-trips.
		if want, _ := OverlayAddr(got.Endpoint.Addr()); want != got.Overlay || got.PublicKey.IsZero() || got.Endpoint.Port() == 0 {
			t.Fatalf("accepted inconsistent %+v", got)
		}
		again, err := ParsePublished(got.Annotations())
		if err != nil || again != got {
			t.Fatalf("round trip %+v -> %+v %v", got, again, err)
		}
	})
}

// TestMergePatchEncryptAll: the encrypt-all annotation is set, and
// removed (null in the merge patch) when the node turns it off.
func TestMergePatchEncryptAll(t *testing.T) {
	p := testPublished(t, "10.0.0.2")
	on, err := p.MergePatch()
	if err != nil || !strings.Contains(string(on), `"`+AnnotationEncryptAll+`":"true"`) {
		t.Fatalf("on: %s %v", on, err)
	}
	p.EncryptAll = false
	off, err := p.MergePatch()
	if err != nil || !strings.Contains(string(off), `"`+AnnotationEncryptAll+`":null`) {
		t.Fatalf("off: %s %v", off, err)
	}
	if got, err := ParsePublished(p.Annotations()); err != nil || got.EncryptAll {
		t.Fatalf("parsed %+v %v", got, err)
	}
}
