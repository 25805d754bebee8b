package installcli

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/deploy"
)

func node(name string, cidrs ...string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
}

func serviceCIDR(name string, cidrs ...string) *networkingv1.ServiceCIDR {
	return &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: cidrs}}
}

func kubeadmConfig(pod, svc string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeadm-config", Namespace: "kube-system"},
		Data: map[string]string{"ClusterConfiguration": "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\n" +
			"networking:\n  dnsDomain: cluster.local\n  podSubnet: " + pod + "\n  serviceSubnet: " + svc + "\n"},
	}
}

func TestDetectCIDRs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		objs  []runtime.Object
		want  string
		note  string
		error string
	}{
		{"nodes and ServiceCIDR", []runtime.Object{
			node("a", "10.244.0.0/24"), node("b", "10.244.1.0/24"), node("c", "10.244.3.0/24"),
			serviceCIDR("kubernetes", "10.96.0.0/12"),
		}, "10.244.0.0/23,10.244.3.0/24,10.96.0.0/12", "3 nodes", ""},
		{"dual stack", []runtime.Object{
			node("a", "10.244.0.0/24", "fd00:10:244::/64"), node("b", "10.244.1.0/24", "fd00:10:244:1::/64"),
			serviceCIDR("kubernetes", "10.96.0.0/16", "fd00:10:96::/112"),
		}, "10.244.0.0/23,fd00:10:244::/63,10.96.0.0/16,fd00:10:96::/112", "ServiceCIDR", ""},
		{"kubeadm beats nodes", []runtime.Object{
			node("a", "10.244.0.0/24"), kubeadmConfig("10.244.0.0/16", "10.96.0.0/12"),
		}, "10.244.0.0/16,10.96.0.0/12", "kubeadm-config", ""},
		{"ServiceCIDR beats kubeadm", []runtime.Object{
			kubeadmConfig("10.244.0.0/16", "10.96.0.0/12"), serviceCIDR("kubernetes", "10.96.0.0/16"), serviceCIDR("extra", "10.200.0.0/16"),
		}, "10.244.0.0/16,10.96.0.0/16,10.200.0.0/16", "ServiceCIDR objects", ""},
		{"no pod CIDRs", []runtime.Object{node("a"), serviceCIDR("kubernetes", "10.96.0.0/12")}, "", "", "pod CIDRs"},
		{"no service CIDRs", []runtime.Object{node("a", "10.244.0.0/24")}, "", "", "Service CIDRs"},
		{"bad node CIDR", []runtime.Object{node("a", "10.244.0.0/33")}, "", "", "node a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := DetectCIDRs(context.Background(), fake.NewClientset(tc.objs...))
			if tc.error != "" {
				if err == nil || !strings.Contains(err.Error(), tc.error) {
					t.Fatalf("err = %v, want one naming %q", err, tc.error)
				}
				if strings.Contains(tc.error, "CIDRs") && !errors.Is(err, ErrNoClusterCIDRs) {
					t.Errorf("err %v is not ErrNoClusterCIDRs", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.String() != tc.want {
				t.Errorf("CIDRs %s, want %s", d, tc.want)
			}
			if !strings.Contains(strings.Join(d.Notes, "\n"), tc.note) {
				t.Errorf("notes %q lack %q", d.Notes, tc.note)
			}
		})
	}
}

func TestMergePrefixes(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"10.0.0.0/24", "10.0.0.0/24"},
		{"10.0.1.0/24 10.0.0.0/24", "10.0.0.0/23"},
		{"10.0.0.0/24 10.0.1.0/24 10.0.2.0/24 10.0.3.0/24", "10.0.0.0/22"},
		{"10.0.1.0/24 10.0.2.0/24", "10.0.1.0/24 10.0.2.0/24"}, // not siblings
		{"10.0.0.0/16 10.0.5.0/24 10.0.0.0/16", "10.0.0.0/16"},
		{"0.0.0.0/1 128.0.0.0/1", "0.0.0.0/0"},
		{"fd00::/64 fd00:0:0:1::/64 10.0.0.0/8", "10.0.0.0/8 fd00::/63"},
	} {
		var in []netip.Prefix
		for _, s := range strings.Fields(tc.in) {
			in = append(in, netip.MustParsePrefix(s))
		}
		var got []string
		for _, p := range MergePrefixes(in) {
			got = append(got, p.String())
		}
		if strings.Join(got, " ") != tc.want {
			t.Errorf("MergePrefixes(%s) = %v, want %s", tc.in, got, tc.want)
		}
	}
}

// FuzzMergePrefixes: the merged list covers exactly the input's
// addresses (checked on each prefix's first and last address and their
// neighbours) and cannot be merged further.
func FuzzMergePrefixes(f *testing.F) {
	f.Add([]byte{10, 0, 0, 0, 24, 10, 0, 1, 0, 24})
	f.Add([]byte{10, 0, 0, 0, 8, 10, 1, 0, 0, 16, 192, 168, 0, 0, 17, 192, 168, 128, 0, 17})
	f.Fuzz(func(t *testing.T, data []byte) {
		var in []netip.Prefix
		for i := 0; i+5 <= len(data) && len(in) < 16; i += 5 {
			addr := netip.AddrFrom4([4]byte(data[i : i+4]))
			p, err := addr.Prefix(int(data[i+4]) % 33)
			if err == nil {
				in = append(in, p)
			}
		}
		out := MergePrefixes(in)
		covered := func(ps []netip.Prefix, a netip.Addr) bool {
			return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
		}
		var probes []netip.Addr
		for _, p := range append(slices.Clone(in), out...) {
			first := p.Masked().Addr()
			b := first.As4()
			v := binary.BigEndian.Uint32(b[:]) | uint32(uint64(1)<<(32-p.Bits())-1)
			var lb [4]byte
			binary.BigEndian.PutUint32(lb[:], v)
			last := netip.AddrFrom4(lb)
			probes = append(probes, first, first.Prev(), last, last.Next())
		}
		for _, a := range probes {
			if a.IsValid() && covered(in, a) != covered(out, a) {
				t.Fatalf("%v -> %v: %s covered %v before, %v after", in, out, a, covered(in, a), covered(out, a))
			}
		}
		if again := MergePrefixes(out); !slices.Equal(again, out) {
			t.Fatalf("not a fixed point: %v -> %v", out, again)
		}
	})
}

// TestReadExisting: an upgrade sees the installed anchors, issuer and the
// settings recorded by the last install (unknown or now-invalid ones
// dropped), and Render records the explicit settings again.
func TestReadExisting(t *testing.T) {
	ctx := context.Background()
	if e, err := ReadExisting(ctx, fake.NewClientset()); err != nil || e != nil {
		t.Fatalf("empty cluster: %+v, %v", e, err)
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: deploy.ConfigMapName, Namespace: deploy.Namespace, Annotations: map[string]string{
			SettingsAnnotation: `{"tunMTU":"9000","cniBinDir":"relative","removedKey":"x","imagePullPolicy":"Never"}`,
		}},
	}
	anchors := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: deploy.TrustAnchorsName, Namespace: deploy.Namespace}, Data: map[string]string{"ca.crt": "PEM"}}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: deploy.IssuerSecretName, Namespace: deploy.Namespace}, Data: map[string][]byte{"tls.crt": []byte("x")}}
	e, err := ReadExisting(ctx, fake.NewClientset(cm, anchors, sec))
	if err != nil {
		t.Fatal(err)
	}
	if string(e.AnchorsPEM) != "PEM" || string(e.Issuer["tls.crt"]) != "x" {
		t.Errorf("existing identity material %+v", e)
	}
	if len(e.Settings) != 2 || e.Settings["tunMTU"] != "9000" || e.Settings["imagePullPolicy"] != "Never" {
		t.Errorf("settings %v, want tunMTU and imagePullPolicy only", e.Settings)
	}
	merged := MergeSettings(e.Settings, map[string]string{"tunMTU": "1500", "clusterCIDRs": "10.0.0.0/8"})
	objs, err := Render(Options{Settings: merged, Record: merged, ExternalIssuer: true, TrustAnchorsPEM: fuzzAnchors})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() == "ConfigMap" && o.GetName() == deploy.ConfigMapName {
			if got := o.GetAnnotations()[SettingsAnnotation]; got != `{"clusterCIDRs":"10.0.0.0/8","imagePullPolicy":"Never","tunMTU":"1500"}` {
				t.Errorf("recorded settings %s", got)
			}
		}
	}

	bad := cm.DeepCopy()
	bad.Annotations[SettingsAnnotation] = "{not json"
	if _, err := ReadExisting(ctx, fake.NewClientset(bad)); err == nil {
		t.Error("a garbled settings annotation was accepted")
	}
}
