package deploy

import (
	"cmp"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/node/wireguard"
)

func objects(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	objs, err := Objects()
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// typed converts the one object of kind/name into out.
func typed(t *testing.T, kind, name string, out any) {
	t.Helper()
	for _, o := range objects(t) {
		if o.GetKind() == kind && o.GetName() == name {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, out, true); err != nil {
				t.Fatalf("%s %s: %v", kind, name, err)
			}
			return
		}
	}
	t.Fatalf("no %s %s in the manifests", kind, name)
}

// TestKustomizationListsEveryFile: `kubectl apply -k deploy/` applies
// every manifest of the folder, each once, the namespace first.
func TestKustomizationListsEveryFile(t *testing.T) {
	res, err := Resources()
	if err != nil {
		t.Fatal(err)
	}
	files, err := fs.Glob(Manifests, "*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	got := slices.Clone(res)
	sort.Strings(got)
	if !slices.Equal(got, files) {
		t.Errorf("kustomization resources %v, folder has %v", res, files)
	}
	if res[0] != "namespace.yaml" {
		t.Errorf("first resource %q, want namespace.yaml", res[0])
	}
	for _, b := range Base {
		if !slices.Contains(res, b) {
			t.Errorf("Base file %s not in kustomization.yaml", b)
		}
	}
}

var clusterScoped = []string{"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
	"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}

// elsewhere are the objects that live outside tunmesh's namespace: the
// agent's read of the cluster's client CA (in kube-system).
var elsewhere = map[string]string{"Role/tunmesh-node-client-ca": "kube-system", "RoleBinding/tunmesh-node-client-ca": "kube-system"}

func TestObjectsWellFormed(t *testing.T) {
	seen := map[string]bool{}
	for _, o := range objects(t) {
		key := o.GetKind() + "/" + o.GetName()
		if seen[key] {
			t.Errorf("%s defined twice", key)
		}
		seen[key] = true
		if slices.Contains(clusterScoped, o.GetKind()) {
			if o.GetNamespace() != "" {
				t.Errorf("%s: cluster-scoped object with namespace %q", key, o.GetNamespace())
			}
		} else if want := cmp.Or(elsewhere[key], Namespace); o.GetNamespace() != want {
			t.Errorf("%s: namespace %q, want %q", key, o.GetNamespace(), want)
		}
		if o.GetLabels()["app.kubernetes.io/part-of"] != "tunmesh" {
			t.Errorf("%s: no app.kubernetes.io/part-of=tunmesh label (uninstall selects by it)", key)
		}
	}
	var ns corev1.Namespace
	typed(t, "Namespace", Namespace, &ns)
	if ns.Annotations["tunmesh.io/inject"] != "disabled" {
		t.Errorf("namespace %s is not marked unmeshed: %v", Namespace, ns.Annotations)
	}
}

// TestDaemonSet pins what docs/install.md promises about the node pods.
func TestDaemonSet(t *testing.T) {
	var ds appsv1.DaemonSet
	typed(t, "DaemonSet", NodeDaemonSetName, &ds)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, dnsPolicy %q", spec.HostNetwork, spec.DNSPolicy)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v: want one that tolerates every taint", spec.Tolerations)
	}
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 1 {
		t.Errorf("update strategy %+v: want RollingUpdate, maxUnavailable 1", ds.Spec.UpdateStrategy)
	}
	wantCaps := map[string][]corev1.Capability{"agent": {"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}, "cni-install": nil}
	if len(spec.Containers) != len(wantCaps) {
		t.Fatalf("%d containers, want agent and cni-install", len(spec.Containers))
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	for _, c := range spec.Containers {
		want, ok := wantCaps[c.Name]
		if !ok {
			t.Errorf("unexpected container %s", c.Name)
			continue
		}
		sc := c.SecurityContext
		if sc == nil || sc.Capabilities == nil {
			t.Errorf("%s: no securityContext.capabilities", c.Name)
			continue
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s is privileged", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s allows privilege escalation", c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: root filesystem writable", c.Name)
		}
		if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || !slices.Equal(sc.Capabilities.Add, want) {
			t.Errorf("%s: capabilities drop %v add %v, want drop [ALL] add %v", c.Name, sc.Capabilities.Drop, sc.Capabilities.Add, want)
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: requests/limits missing: %+v", c.Name, c.Resources)
		}
		for _, m := range c.VolumeMounts {
			if _, ok := volumes[m.Name]; !ok {
				t.Errorf("%s mounts undefined volume %s", c.Name, m.Name)
			}
		}
	}
	agent := spec.Containers[0]
	if agent.ReadinessProbe == nil || agent.ReadinessProbe.HTTPGet == nil || agent.ReadinessProbe.HTTPGet.Path != "/ready" ||
		agent.ReadinessProbe.HTTPGet.Port.IntValue() != 4191 || agent.LivenessProbe == nil {
		t.Errorf("agent probes: readiness %+v liveness %+v", agent.ReadinessProbe, agent.LivenessProbe)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range agent.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for _, p := range []string{"/var/run/netns", "/run/containerd/io.containerd.grpc.v1.cri/netns"} {
		m, ok := mounts[p]
		if !ok || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
			t.Errorf("agent: netns dir %s not mounted with HostToContainer propagation: %+v", p, m)
		}
		if hp := volumes[m.Name].HostPath; hp == nil || strings.TrimPrefix(hp.Path, "/var") != strings.TrimPrefix(p, "/var") {
			t.Errorf("agent: %s is not the host's own path: %+v", p, volumes[m.Name])
		}
	}
	// net.* sysctls are written through the host's /proc/sys/net (the
	// container's /proc/sys is read-only): only that subtree is mounted.
	if v := volumes[mounts["/host/proc/sys/net"].Name].HostPath; v == nil || v.Path != "/proc/sys/net" ||
		argValue(agent.Args, "--proc-sys-dir")+"/net" != "/host/proc/sys/net" {
		t.Errorf("proc sys: volume %+v, --proc-sys-dir %q", v, argValue(agent.Args, "--proc-sys-dir"))
	}
	if v := volumes[mounts["/dev/net/tun"].Name].HostPath; v == nil || v.Type == nil || *v.Type != corev1.HostPathCharDev {
		t.Errorf("/dev/net/tun: %+v, want a CharDevice hostPath", v)
	}
	// The projected token: audience tunmesh-identity, at the path the
	// agent reads (its --token-file).
	tok := mounts["/var/run/secrets/tunmesh/tokens"]
	pv := volumes[tok.Name].Projected
	if pv == nil || len(pv.Sources) != 1 || pv.Sources[0].ServiceAccountToken == nil ||
		pv.Sources[0].ServiceAccountToken.Audience != "tunmesh-identity" ||
		tok.MountPath+"/"+pv.Sources[0].ServiceAccountToken.Path != argValue(agent.Args, "--token-file") {
		t.Errorf("identity token volume %+v mounted at %s; agent --token-file %q", pv, tok.MountPath, argValue(agent.Args, "--token-file"))
	}
	if anchors := mounts["/etc/tunmesh/identity"]; volumes[anchors.Name].ConfigMap == nil ||
		volumes[anchors.Name].ConfigMap.Name != TrustAnchorsName || argValue(agent.Args, "--trust-anchors") != anchors.MountPath+"/ca.crt" {
		t.Errorf("trust anchors: %+v, --trust-anchors %q", volumes[anchors.Name], argValue(agent.Args, "--trust-anchors"))
	}
	// The agent reports on the conflist the installer patches: the same
	// host dir, read only for the agent.
	agentConf, installerConf := mounts[argValue(agent.Args, "--cni-conf-dir")], corev1.VolumeMount{}
	for _, m := range spec.Containers[1].VolumeMounts {
		if m.MountPath == argValue(spec.Containers[1].Args, "--conf-dir") {
			installerConf = m
		}
	}
	if agentConf.Name == "" || agentConf.Name != installerConf.Name || !agentConf.ReadOnly || installerConf.ReadOnly {
		t.Errorf("CNI conf dir: agent mount %+v, installer mount %+v", agentConf, installerConf)
	}
	// The CNI socket the installer writes into the conflist is the one the
	// agent listens on, on the host.
	sock := argValue(agent.Args, "--cni-socket")
	if sock != argValue(spec.Containers[1].Args, "--socket") || !strings.HasPrefix(sock, "/var/run/tunmesh/") ||
		volumes[mounts["/var/run/tunmesh"].Name].HostPath.Path != "/run/tunmesh" {
		t.Errorf("CNI socket: agent %q, installer %q", sock, argValue(spec.Containers[1].Args, "--socket"))
	}
}

func argValue(args []string, flag string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v
		}
	}
	return ""
}

// commandFlags returns the flag names a command's main.go defines on its
// FlagSet (fs.StringVar(&x, "name", ...), fs.Bool("name", ...), ...),
// read from the source so that the test needs no build.
func commandFlags(t *testing.T, dir string) map[string]bool {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, filepath.Join("..", dir), func(fi fs.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
	if err != nil {
		t.Fatal(err)
	}
	flags := map[string]bool{}
	for _, p := range pkgs {
		for _, f := range p.Files {
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				if id, ok := sel.X.(*ast.Ident); !ok || id.Name != "fs" {
					return true
				}
				// fs.XxxVar(&v, "name", ...) or fs.Xxx("name", ...).
				idx := 0
				if strings.HasSuffix(sel.Sel.Name, "Var") {
					idx = 1
				}
				if idx >= len(call.Args) {
					return true
				}
				if lit, ok := call.Args[idx].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if s, err := strconv.Unquote(lit.Value); err == nil {
						flags[s] = true
					}
				}
				return true
			})
		}
	}
	if len(flags) == 0 {
		t.Fatalf("found no flags in %s", dir)
	}
	return flags
}

// TestArgsAreFlags: every flag the manifests pass is one the binary
// defines, and every $(VAR) in args is set in the container's env from a
// key that the settings ConfigMap has.
func TestArgsAreFlags(t *testing.T) {
	var cm corev1.ConfigMap
	typed(t, "ConfigMap", ConfigMapName, &cm)
	var ds appsv1.DaemonSet
	typed(t, "DaemonSet", NodeDaemonSetName, &ds)
	var dep appsv1.Deployment
	typed(t, "Deployment", IdentityName, &dep)
	cmds := map[string]string{
		"agent":       "node/cmd/tunmesh-node",
		"cni-install": "cni/cmd/tunmesh-cni-install",
		"identity":    "identity/cmd/tunmesh-identity",
	}
	varRef := regexp.MustCompile(`\$\(([A-Z_]+)\)`)
	containers := append(slices.Clone(ds.Spec.Template.Spec.Containers), dep.Spec.Template.Spec.Containers...)
	for _, c := range containers {
		flags := commandFlags(t, cmds[c.Name])
		env := map[string]bool{}
		for _, e := range c.Env {
			env[e.Name] = true
			if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil {
				if r.ConfigMapKeyRef.Name != ConfigMapName {
					t.Errorf("%s: env %s from ConfigMap %s", c.Name, e.Name, r.ConfigMapKeyRef.Name)
				} else if _, ok := cm.Data[r.ConfigMapKeyRef.Key]; !ok {
					t.Errorf("%s: env %s from missing key %s", c.Name, e.Name, r.ConfigMapKeyRef.Key)
				}
			}
		}
		for _, a := range c.Args {
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if !strings.HasPrefix(a, "--") || !flags[name] {
				t.Errorf("%s: %q is not a flag of %s", c.Name, a, cmds[c.Name])
			}
			for _, m := range varRef.FindAllStringSubmatch(a, -1) {
				if !env[m[1]] {
					t.Errorf("%s: %q uses $(%s), not in env", c.Name, a, m[1])
				}
			}
		}
	}
}

// TestNodeGuard pins node-guard.yaml to the code: it applies to the
// agents' ServiceAccount (as the DaemonSet names it), to every write of a
// node or its subresources, fails closed, is bound with Deny, and lets
// through the annotations the agents publish (under WireGuard's and the
// observability pin's domains). Its behaviour is tested against a real
// API server (tools/e2e TestNodeGuard).
func TestNodeGuard(t *testing.T) {
	var p admissionregistrationv1.ValidatingAdmissionPolicy
	typed(t, "ValidatingAdmissionPolicy", NodeGuardName, &p)
	if p.Spec.FailurePolicy == nil || *p.Spec.FailurePolicy != admissionregistrationv1.Fail {
		t.Errorf("failurePolicy %v, want Fail", p.Spec.FailurePolicy)
	}
	mc := p.Spec.MatchConstraints
	if mc == nil || len(mc.ResourceRules) != 1 {
		t.Fatalf("matchConstraints %+v: want one resource rule", mc)
	}
	r := mc.ResourceRules[0].Rule
	if !slices.Equal(r.APIGroups, []string{""}) || !slices.Contains(r.Resources, "nodes") || !slices.Contains(r.Resources, "nodes/*") {
		t.Errorf("rule %+v: want nodes and nodes/* of the core group", r)
	}
	if ops := mc.ResourceRules[0].Operations; !slices.Contains(ops, admissionregistrationv1.Update) {
		t.Errorf("operations %v: want UPDATE (a patch)", ops)
	}

	var ds appsv1.DaemonSet
	typed(t, "DaemonSet", NodeDaemonSetName, &ds)
	user := "system:serviceaccount:" + Namespace + ":" + ds.Spec.Template.Spec.ServiceAccountName
	if len(p.Spec.MatchConditions) != 1 || p.Spec.MatchConditions[0].Expression != "request.userInfo.username == '"+user+"'" {
		t.Errorf("matchConditions %+v: want exactly the agents' user %s", p.Spec.MatchConditions, user)
	}

	var prefixes []string
	for _, v := range p.Spec.Variables {
		if v.Name == "tunmeshAnnotationPrefixes" {
			for _, m := range regexp.MustCompile(`'([^']*)'`).FindAllStringSubmatch(v.Expression, -1) {
				prefixes = append(prefixes, m[1])
			}
		}
	}
	if !slices.Equal(prefixes, []string{"wireguard.tunmesh.io/", "observe.tunmesh.io/"}) {
		t.Errorf("node-guard.yaml lets agents change annotations under %q, want WireGuard's and the observability pin's domains only", prefixes)
	}
	published := []string{wireguard.AnnotationPublicKey, wireguard.AnnotationEndpoint, wireguard.AnnotationOverlay,
		wireguard.AnnotationEncryptAll, observeapi.FingerprintAnnotation}
	for _, a := range published {
		if !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(a, p) }) {
			t.Errorf("agents publish %s on their Node; node-guard.yaml refuses it (prefixes %q)", a, prefixes)
		}
	}
	var rules []string
	for _, v := range p.Spec.Validations {
		rules = append(rules, v.Expression)
	}
	for _, want := range []string{"!has(request.subResource) || request.subResource == ''", "object.metadata.name == variables.nodeName"} {
		if !slices.Contains(rules, want) {
			t.Errorf("no validation %q in %q", want, rules)
		}
	}

	var b admissionregistrationv1.ValidatingAdmissionPolicyBinding
	typed(t, "ValidatingAdmissionPolicyBinding", NodeGuardName, &b)
	if b.Spec.PolicyName != NodeGuardName || !slices.Equal(b.Spec.ValidationActions, []admissionregistrationv1.ValidationAction{admissionregistrationv1.Deny}) {
		t.Errorf("binding %+v: want policy %s with Deny", b.Spec, NodeGuardName)
	}
	if b.Spec.ParamRef != nil || b.Spec.MatchResources != nil {
		t.Errorf("binding %+v narrows the policy (paramRef or matchResources)", b.Spec)
	}
}
