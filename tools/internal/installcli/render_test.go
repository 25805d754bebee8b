package installcli

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/ca"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden.*")

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("output differs from %s (go test -run %s -update rewrites it):\n%s", path, t.Name(), got)
	}
}

func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string, out any) {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, out, true); err != nil {
				t.Fatalf("%s %s: %v", kind, name, err)
			}
			return
		}
	}
	t.Fatalf("no %s %s", kind, name)
}

// TestRenderGolden: an install with an external issuer is deterministic,
// so its whole output is pinned.
func TestRenderGolden(t *testing.T) {
	set, err := ParseSettings([]string{"clusterCIDRs=10.244.0.0/16,10.96.0.0/12", "identityReplicas=2", "logLevel=debug"})
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Render(Options{
		Registry: "registry.example.com/mesh/", Tag: "v1.2.3",
		ExternalIssuer: true, TrustAnchorsPEM: readTestdata(t, "anchors.pem"), Settings: set,
	})
	if err != nil {
		t.Fatal(err)
	}
	var yamlOut, jsonOut bytes.Buffer
	if err := Write(&yamlOut, objs, "yaml"); err != nil {
		t.Fatal(err)
	}
	golden(t, "install-external.golden.yaml", yamlOut.Bytes())
	if err := Write(&jsonOut, objs, "json"); err != nil {
		t.Fatal(err)
	}
	var list struct {
		Kind  string
		Items []map[string]any
	}
	if err := json.Unmarshal(jsonOut.Bytes(), &list); err != nil || list.Kind != "List" || len(list.Items) != len(objs) {
		t.Fatalf("json output: %v, kind %q, %d items for %d objects", err, list.Kind, len(list.Items), len(objs))
	}
	// Read back through the decoder kubectl-like tools use: same objects.
	back, err := deploy.Decode(yamlOut.Bytes())
	if err != nil || len(back) != len(objs) {
		t.Fatalf("decode own output: %v (%d of %d objects)", err, len(back), len(objs))
	}
}

func TestRenderSettings(t *testing.T) {
	set, err := ParseSettings([]string{
		"clusterCIDRs=10.1.0.0/16,10.2.0.0/16", "cniBinDir=/home/kubernetes/bin", "cniConfDir=/etc/cni/custom",
		"netnsDir=/run/netns", "containerdNetnsDir=/run/k3s/containerd/netns", "imagePullPolicy=Never",
		"failOpen=true", "tunMTU=9000", "identityReplicas=3",
	})
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Render(Options{Registry: "localhost:5000", Tag: "t1", Settings: set})
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	find(t, objs, "ConfigMap", deploy.ConfigMapName, &cm)
	if cm.Data["clusterCIDRs"] != "10.1.0.0/16,10.2.0.0/16" || cm.Data["failOpen"] != "true" || cm.Data["tunMTU"] != "9000" || cm.Data["trustDomain"] != "cluster.local" {
		t.Errorf("settings ConfigMap: %v", cm.Data)
	}
	var ds appsv1.DaemonSet
	find(t, objs, "DaemonSet", deploy.NodeDaemonSetName, &ds)
	hostPaths := map[string]string{}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	for vol, want := range map[string]string{"cni-bin": "/home/kubernetes/bin", "cni-conf": "/etc/cni/custom", "netns": "/run/netns", "containerd-netns": "/run/k3s/containerd/netns", "state": "/var/lib/tunmesh"} {
		if hostPaths[vol] != want {
			t.Errorf("volume %s: host path %q, want %q", vol, hostPaths[vol], want)
		}
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if !strings.HasPrefix(c.Image, "localhost:5000/tunmesh-") || !strings.HasSuffix(c.Image, ":t1") || c.ImagePullPolicy != corev1.PullNever {
			t.Errorf("%s: image %q pull %q", c.Name, c.Image, c.ImagePullPolicy)
		}
		for _, m := range c.VolumeMounts {
			if (m.Name == "netns" || m.Name == "containerd-netns") && m.MountPath != hostPaths[m.Name] {
				t.Errorf("%s: netns mount %s at %s, want the host path %s", c.Name, m.Name, m.MountPath, hostPaths[m.Name])
			}
		}
	}
	if img := ds.Spec.Template.Spec.Containers[1].Image; img != "localhost:5000/tunmesh-cni:t1" {
		t.Errorf("installer image %q", img)
	}
	var dep appsv1.Deployment
	find(t, objs, "Deployment", deploy.IdentityName, &dep)
	if *dep.Spec.Replicas != 3 || dep.Spec.Template.Spec.Containers[0].Image != "localhost:5000/tunmesh-identity:t1" {
		t.Errorf("identity: replicas %d image %q", *dep.Spec.Replicas, dep.Spec.Template.Spec.Containers[0].Image)
	}
}

// TestRenderGeneratesIssuer: without an external issuer, the output holds
// a trust anchors ConfigMap and an issuer Secret that loads with them, both
// before the workloads that mount them; two installs get different anchors.
func TestRenderGeneratesIssuer(t *testing.T) {
	set := map[string]string{"clusterCIDRs": "10.244.0.0/16"}
	var anchors [2]string
	for i := range anchors {
		objs, err := Render(Options{Settings: set})
		if err != nil {
			t.Fatal(err)
		}
		var cm corev1.ConfigMap
		find(t, objs, "ConfigMap", deploy.TrustAnchorsName, &cm)
		var sec corev1.Secret
		find(t, objs, "Secret", deploy.IssuerSecretName, &sec)
		a, err := ca.ParseAnchors([]byte(cm.Data["ca.crt"]))
		if err != nil {
			t.Fatal(err)
		}
		if sec.Type != corev1.SecretTypeTLS || sec.StringData["ca.crt"] != cm.Data["ca.crt"] {
			t.Errorf("issuer Secret type %q, ca.crt matches anchors: %v", sec.Type, sec.StringData["ca.crt"] == cm.Data["ca.crt"])
		}
		if _, err := ca.ParseIssuer([]byte(sec.StringData["tls.crt"]), []byte(sec.StringData["tls.key"]), a, time.Now()); err != nil {
			t.Errorf("generated issuer does not load: %v", err)
		}
		if strings.Contains(cm.Data["ca.crt"], "PRIVATE KEY") {
			t.Error("a private key in the trust anchors ConfigMap")
		}
		order := map[string]int{}
		for i, o := range objs {
			order[o.GetKind()+"/"+o.GetName()] = i
		}
		if order["Secret/"+deploy.IssuerSecretName] > order["Deployment/"+deploy.IdentityName] ||
			order["ConfigMap/"+deploy.TrustAnchorsName] > order["DaemonSet/"+deploy.NodeDaemonSetName] {
			t.Errorf("identity material after the workloads: %v", order)
		}
		anchors[i] = cm.Data["ca.crt"]
	}
	if anchors[0] == anchors[1] {
		t.Error("two installs generated the same trust anchor")
	}
}

// TestRenderKeepsExisting: an upgrade keeps the installed anchors and
// issuer; a broken existing pair is refused, not silently replaced.
func TestRenderKeepsExisting(t *testing.T) {
	set := map[string]string{"clusterCIDRs": "10.244.0.0/16"}
	first, err := Render(Options{Settings: set})
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	find(t, first, "ConfigMap", deploy.TrustAnchorsName, &cm)
	var sec corev1.Secret
	find(t, first, "Secret", deploy.IssuerSecretName, &sec)
	existing := &Existing{AnchorsPEM: []byte(cm.Data["ca.crt"]), Issuer: map[string][]byte{}}
	for k, v := range sec.StringData {
		existing.Issuer[k] = []byte(v)
	}
	again, err := Render(Options{Settings: set, Tag: "v2", Existing: existing})
	if err != nil {
		t.Fatal(err)
	}
	var cm2 corev1.ConfigMap
	find(t, again, "ConfigMap", deploy.TrustAnchorsName, &cm2)
	var sec2 corev1.Secret
	find(t, again, "Secret", deploy.IssuerSecretName, &sec2)
	if cm2.Data["ca.crt"] != cm.Data["ca.crt"] || sec2.StringData["tls.key"] != sec.StringData["tls.key"] {
		t.Error("upgrade replaced the installed anchors or issuer")
	}

	other := readTestdata(t, "anchors.pem") // the issuer does not chain to these
	_, err = Render(Options{Settings: set, Existing: &Existing{AnchorsPEM: other, Issuer: existing.Issuer}})
	if err == nil || !strings.Contains(err.Error(), "does not load") {
		t.Errorf("mismatched existing issuer: %v", err)
	}
}

func TestRenderRefuses(t *testing.T) {
	anchors := readTestdata(t, "anchors.pem")
	cidrs := map[string]string{"clusterCIDRs": "10.244.0.0/16"}
	for _, tc := range []struct {
		name string
		o    Options
		want error
		msg  string
	}{
		{"external issuer without anchors", Options{ExternalIssuer: true, Settings: cidrs}, ErrNoIssuer, "--identity-trust-anchors"},
		{"anchors without external issuer", Options{TrustAnchorsPEM: anchors, Settings: cidrs}, ErrNoIssuer, "--identity-external-issuer"},
		{"no cluster CIDRs", Options{}, ErrNoClusterCIDRs, "--set clusterCIDRs"},
		{"bad anchors", Options{ExternalIssuer: true, TrustAnchorsPEM: []byte("not pem"), Settings: cidrs}, nil, "trust anchors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Render(tc.o)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Render: %v; want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}
}

func TestParseSettings(t *testing.T) {
	good := []string{"clusterCIDRs=10.0.0.0/8,fd00::/48", "trustDomain=example.org", "failOpen=true", "cniBinDir=/opt/cni/bin", "clusterCIDRs=10.1.0.0/16"}
	got, err := ParseSettings(good)
	if err != nil {
		t.Fatal(err)
	}
	if got["clusterCIDRs"] != "10.1.0.0/16" || got["trustDomain"] != "example.org" {
		t.Errorf("parsed %v (later values win)", got)
	}
	for _, bad := range []string{"nokey", "bogus=1", "clusterCIDRs=10.0.0.1/8", "clusterCIDRs=", "failOpen=yes", "tunMTU=70000",
		"cniBinDir=relative", "cniBinDir=/a/../b", "certLifetime=-1h", "logLevel=loud", "trustDomain=Bad_Domain", "identityReplicas=0"} {
		if _, err := ParseSettings([]string{bad}); !errors.Is(err, ErrBadSetting) {
			t.Errorf("ParseSettings(%q) = %v, want ErrBadSetting", bad, err)
		}
	}
}

// TestUninstallGolden: the delete list names every object install
// creates, DaemonSet first and namespace last.
func TestUninstallGolden(t *testing.T) {
	var out bytes.Buffer
	if err := WriteUninstall(&out, "yaml"); err != nil {
		t.Fatal(err)
	}
	golden(t, "uninstall.golden.yaml", out.Bytes())
	refs, err := UninstallObjects()
	if err != nil {
		t.Fatal(err)
	}
	installed, err := Render(Options{Settings: map[string]string{"clusterCIDRs": "10.0.0.0/8"}})
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, r := range refs {
		names[r.GetKind()+"/"+r.GetNamespace()+"/"+r.GetName()] = true
	}
	for _, o := range installed {
		if !names[o.GetKind()+"/"+o.GetNamespace()+"/"+o.GetName()] {
			t.Errorf("uninstall misses %s %s", o.GetKind(), o.GetName())
		}
	}
	if len(refs) != len(installed) || refs[0].GetKind() != "DaemonSet" || refs[len(refs)-1].GetKind() != "Namespace" {
		t.Errorf("%d refs for %d installed objects; first %s, last %s", len(refs), len(installed), refs[0].GetKind(), refs[len(refs)-1].GetKind())
	}
}

// FuzzParseSettings: any --set value either is refused with ErrBadSetting
// or renders (with cluster CIDRs given) into manifests that decode again.
func FuzzParseSettings(f *testing.F) {
	for _, s := range []string{"clusterCIDRs=10.0.0.0/8", "tunMTU=9000", "cniBinDir=/opt/cni/bin", "trustDomain=example.org",
		"failOpen=true", "identityReplicas=3", "logLevel=debug", "nokey", "certLifetime=1h30m", "netnsDir=/a//b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, pair string) {
		set, err := ParseSettings([]string{pair})
		if err != nil {
			if !errors.Is(err, ErrBadSetting) {
				t.Fatalf("ParseSettings(%q): %v is not ErrBadSetting", pair, err)
			}
			return
		}
		if set["clusterCIDRs"] == "" {
			set["clusterCIDRs"] = "10.0.0.0/8"
		}
		objs, err := Render(Options{Settings: set, ExternalIssuer: true, TrustAnchorsPEM: fuzzAnchors})
		if err != nil {
			t.Fatalf("accepted %q but Render failed: %v", pair, err)
		}
		var out bytes.Buffer
		if err := Write(&out, objs, "yaml"); err != nil {
			t.Fatal(err)
		}
		back, err := deploy.Decode(out.Bytes())
		if err != nil || len(back) != len(objs) {
			t.Fatalf("accepted %q: output does not decode (%v, %d of %d objects)", pair, err, len(back), len(objs))
		}
	})
}

var fuzzAnchors = func() []byte {
	b, err := os.ReadFile(filepath.Join("testdata", "anchors.pem"))
	if err != nil {
		panic(err)
	}
	return b
}()
