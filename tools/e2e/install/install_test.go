// Package install validates tunmesh's manifests against a real API server:
// everything `tunmeshctl install` prints, the kustomize base in deploy/ and
// what `tunmeshctl uninstall` lists pass a server-side dry run (schema,
// strict field validation, admission), on a bare local cluster.
package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{Mesh: false}) }

// ctl runs the built tunmeshctl against the cluster.
func ctl(t *testing.T, c *e2eenv.Cluster, args ...string) (stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.BinDir, "tunmeshctl"), args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.State.Kubeconfig)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		t.Fatalf("tunmeshctl %s: %v\n%s", strings.Join(args, " "), err, e.String())
	}
	return o.String(), e.String()
}

// kubectlIn runs kubectl with stdin.
func kubectlIn(t *testing.T, c *e2eenv.Cluster, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(c.KubectlBin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.State.Kubeconfig)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// withNamespace creates tunmesh's namespace for real (a dry-run create of
// the namespace does not make the namespaced objects' dry runs pass) and
// deletes it at the end.
func withNamespace(t *testing.T, c *e2eenv.Cluster) {
	t.Helper()
	ns, err := deploy.Manifests.ReadFile("namespace.yaml")
	if err != nil {
		t.Fatal(err)
	}
	kubectlIn(t, c, string(ns), "apply", "-f", "-")
	// Wait for the namespace to be gone: the next test creates it again.
	t.Cleanup(func() {
		if out, err := c.KubectlErr("delete", "namespace", deploy.Namespace, "--ignore-not-found", "--timeout=2m"); err != nil {
			t.Errorf("delete namespace: %v\n%s", err, out)
		}
	})
}

// objectLines counts kubectl's "<kind>/<name> <verb> (server dry run)"
// lines.
func objectLines(out string) int {
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if strings.HasSuffix(l, "(server dry run)") {
			n++
		}
	}
	return n
}

// TestInstallDryRun: `tunmeshctl install` (cluster CIDRs detected from
// this cluster, a generated issuer) and its -o json form pass a strict
// server-side dry run, every object.
func TestInstallDryRun(t *testing.T) {
	c := e2eenv.Need(t)
	withNamespace(t, c)
	for _, format := range []string{"yaml", "json"} {
		t.Run(format, func(t *testing.T) {
			manifests, notes := ctl(t, c, "install", "-o", format, "--registry", "registry.example.com/tunmesh", "--tag", "v0.0.0-test")
			if !strings.Contains(notes, "pod CIDRs from") || !strings.Contains(notes, "Service CIDRs from") {
				t.Errorf("install did not say where the CIDRs came from:\n%s", notes)
			}
			objs, err := deploy.Decode([]byte(manifests))
			if err != nil {
				t.Fatal(err)
			}
			if format == "json" {
				objs, err = listItems(manifests)
				if err != nil {
					t.Fatal(err)
				}
			}
			out := kubectlIn(t, c, manifests, "apply", "--dry-run=server", "--validate=strict", "-f", "-")
			if n := objectLines(out); n != len(objs) {
				t.Errorf("dry run reported %d objects, install printed %d:\n%s", n, len(objs), out)
			}
		})
	}
}

// TestExternalIssuerDryRun: with --identity-external-issuer the output has
// the given trust anchors and no issuer Secret, and passes too.
func TestExternalIssuerDryRun(t *testing.T) {
	c := e2eenv.Need(t)
	withNamespace(t, c)
	dir := t.TempDir()
	ctl(t, c, "identity", "bootstrap", "--dir", dir)
	manifests, _ := ctl(t, c, "install", "--identity-external-issuer", "--identity-trust-anchors", filepath.Join(dir, "ca.crt"),
		"--set", "clusterCIDRs=10.244.0.0/16,10.96.0.0/12", "--set", "identityReplicas=2")
	if strings.Contains(manifests, "kind: Secret") {
		t.Error("external issuer: install printed a Secret")
	}
	out := kubectlIn(t, c, manifests, "apply", "--dry-run=server", "--validate=strict", "-f", "-")
	if !strings.Contains(out, "daemonset.apps/tunmesh-node created (server dry run)") {
		t.Errorf("dry run:\n%s", out)
	}
	// The issuer Secret bootstrap wrote (cert-manager layout) fits too.
	secret, err := os.ReadFile(filepath.Join(dir, "issuer-secret.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kubectlIn(t, c, string(secret), "apply", "--dry-run=server", "--validate=strict", "-f", "-")
}

// TestKustomizeBaseDryRun: `kubectl apply -k deploy/` as a user runs it.
func TestKustomizeBaseDryRun(t *testing.T) {
	c := e2eenv.Need(t)
	withNamespace(t, c)
	_, self, _, _ := runtime.Caller(0)
	dir := filepath.Join(filepath.Dir(self), "..", "..", "..", "deploy")
	out := kubectlIn(t, c, "", "apply", "--dry-run=server", "--validate=strict", "-k", dir)
	objs, err := deploy.Objects()
	if err != nil {
		t.Fatal(err)
	}
	if n := objectLines(out); n != len(objs) {
		t.Errorf("dry run reported %d objects, the base has %d:\n%s", n, len(objs), out)
	}
}

// TestUninstallDryRun: after a real install of the objects (no workloads
// run on a bare cluster without images: the DaemonSet's pods stay pending
// at most), `tunmeshctl uninstall | kubectl delete` finds every object.
func TestUninstallDryRun(t *testing.T) {
	c := e2eenv.Need(t)
	withNamespace(t, c)
	manifests, _ := ctl(t, c, "install", "--set", "clusterCIDRs=10.244.0.0/16,10.96.0.0/12", "--set", "imagePullPolicy=Never")
	kubectlIn(t, c, parked(t, manifests), "apply", "-f", "-")
	t.Cleanup(func() {
		refs, _ := ctlOut(c, "uninstall")
		cmd := exec.Command(c.KubectlBin, "delete", "--ignore-not-found", "--timeout=2m", "-f", "-")
		cmd.Env = append(os.Environ(), "KUBECONFIG="+c.State.Kubeconfig)
		cmd.Stdin = strings.NewReader(refs)
		_ = cmd.Run()
	})
	refs, _ := ctl(t, c, "uninstall")
	out := kubectlIn(t, c, refs, "delete", "--dry-run=server", "-f", "-")
	objs, err := deploy.Decode([]byte(refs))
	if err != nil {
		t.Fatal(err)
	}
	if n := objectLines(out); n != len(objs) || strings.Count(out, " deleted") != len(objs) {
		t.Errorf("delete dry run found %d of %d objects:\n%s", n, len(objs), out)
	}
	// Re-running install against the installed cluster keeps the trust
	// anchors (an upgrade must not re-key the mesh).
	before := kubectlIn(t, c, "", "get", "configmap", "-n", deploy.Namespace, deploy.TrustAnchorsName, "-o", "jsonpath={.data.ca\\.crt}")
	again, notes := ctl(t, c, "install", "--tag", "v2", "--set", "clusterCIDRs=10.244.0.0/16,10.96.0.0/12")
	if !strings.Contains(notes, "keeping the installed trust anchors") || !strings.Contains(again, strings.TrimSpace(strings.Split(before, "\n")[1])) {
		t.Errorf("re-install did not keep the anchors; notes:\n%s", notes)
	}
	// ... and the settings given then (imagePullPolicy=Never).
	if !strings.Contains(notes, "keeping the installed settings imagePullPolicy=Never") || !strings.Contains(again, "imagePullPolicy: Never") {
		t.Errorf("re-install did not keep the settings; notes:\n%s", notes)
	}
}

// parked returns the manifests with the workloads unable to run: the
// kubelet stand-in runs a container's image name as a host command, and
// these tests check objects, not pods.
func parked(t *testing.T, manifests string) string {
	t.Helper()
	objs, err := deploy.Decode([]byte(manifests))
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, o := range objs {
		switch o.GetKind() {
		case "Deployment", "DaemonSet":
			if err := unstructured.SetNestedStringMap(o.Object, map[string]string{"tunmesh.io/e2e-no-such-node": "true"}, "spec", "template", "spec", "nodeSelector"); err != nil {
				t.Fatal(err)
			}
			if o.GetKind() == "Deployment" {
				if err := unstructured.SetNestedField(o.Object, int64(0), "spec", "replicas"); err != nil {
					t.Fatal(err)
				}
			}
		}
		y, err := yaml.Marshal(o.Object)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return b.String()
}

func ctlOut(c *e2eenv.Cluster, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.BinDir, "tunmeshctl"), args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.State.Kubeconfig)
	out, err := cmd.Output()
	return string(out), err
}
