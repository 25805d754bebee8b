package installcli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

// Defaults of the image references: ghcr.io/tunmesh/<name>:<tag>, as the
// manifests in deploy/ name them and `make images` tags them.
const (
	DefaultRegistry = "ghcr.io/tunmesh"
	DefaultTag      = "dev"
)

// Sentinel errors of Render.
var (
	// ErrNoIssuer: --identity-external-issuer without trust anchors (the
	// agents could not verify anything the external issuer signs).
	ErrNoIssuer = errors.New("no identity issuer")
	// ErrNoClusterCIDRs: clusterCIDRs neither set nor detected.
	ErrNoClusterCIDRs = errors.New("no cluster CIDRs")
)

// Options configure Render.
type Options struct {
	// Registry and Tag rewrite every image reference (empty: defaults).
	Registry, Tag string
	// ExternalIssuer leaves the issuer Secret to the user (cert-manager);
	// TrustAnchorsPEM must then hold the trust anchors it chains to.
	// Without it Render generates a trust anchor and an issuer (the anchor's
	// key is discarded, as linkerd install does).
	ExternalIssuer  bool
	TrustAnchorsPEM []byte
	// Settings are the --set values (see ParseSettings); clusterCIDRs is
	// required.
	Settings map[string]string
	// Now is the start of a generated issuer's validity (zero: now).
	Now time.Time
	// Existing is the identity material already on the cluster (see
	// ReadExisting): without ExternalIssuer it is kept instead of
	// generating a new anchor and issuer.
	Existing *Existing
	// Record are the settings given explicitly (not detected), written to
	// the settings ConfigMap's SettingsAnnotation for the next upgrade.
	Record map[string]string
}

// timeNow is time.Now, for checks of existing material.
var timeNow = time.Now

// Render returns the manifests of deploy/ with o applied, plus the trust
// anchors ConfigMap and (unless ExternalIssuer) the issuer Secret, in apply
// order.
func Render(o Options) ([]*unstructured.Unstructured, error) {
	set := withDefaults(o.Settings)
	if set["clusterCIDRs"] == "" {
		return nil, fmt.Errorf("%w: set them with --set clusterCIDRs=POD_CIDR,SERVICE_CIDR", ErrNoClusterCIDRs)
	}
	for k, v := range set {
		if v == "" {
			continue
		}
		if err := settings[k].check(v); err != nil {
			return nil, fmt.Errorf("%w: %s=%q: %w", ErrBadSetting, k, v, err)
		}
	}
	if set["encryptAll"] == "true" && set["transport"] != "wireguard" {
		return nil, fmt.Errorf("%w: encryptAll=true needs transport=wireguard", ErrBadSetting)
	}
	if set["wireguardRequired"] == "true" && set["transport"] != "wireguard" {
		return nil, fmt.Errorf("%w: wireguardRequired=true needs transport=wireguard", ErrBadSetting)
	}
	identityObjs, err := identityObjects(o, set["trustDomain"])
	if err != nil {
		return nil, err
	}
	objs, err := deploy.Objects()
	if err != nil {
		return nil, err
	}
	registry, tag := o.Registry, o.Tag
	if registry == "" {
		registry = DefaultRegistry
	}
	if tag == "" {
		tag = DefaultTag
	}
	registry = strings.TrimSuffix(registry, "/")

	var out []*unstructured.Unstructured
	for _, obj := range objs {
		switch {
		case obj.GetKind() == "ConfigMap" && obj.GetName() == deploy.ConfigMapName:
			for k, s := range settings {
				if s.configMap {
					if err := unstructured.SetNestedField(obj.Object, set[k], "data", k); err != nil {
						return nil, err
					}
				}
			}
			if len(o.Record) > 0 {
				given, err := json.Marshal(o.Record) // sorted keys
				if err != nil {
					return nil, err
				}
				ann := obj.GetAnnotations()
				if ann == nil {
					ann = map[string]string{}
				}
				ann[SettingsAnnotation] = string(given)
				obj.SetAnnotations(ann)
			}
		case obj.GetKind() == "Deployment" || obj.GetKind() == "DaemonSet":
			if len(identityObjs) > 0 {
				// Trust anchors and issuer before the first workload that
				// mounts them.
				out = append(out, identityObjs...)
				identityObjs = nil
			}
			if err := rewritePodSpec(obj, registry, tag, set); err != nil {
				return nil, fmt.Errorf("%s %s: %w", obj.GetKind(), obj.GetName(), err)
			}
			if obj.GetKind() == "Deployment" && obj.GetName() == deploy.IdentityName {
				n, _ := strconv.ParseInt(set["identityReplicas"], 10, 64)
				if err := unstructured.SetNestedField(obj.Object, n, "spec", "replicas"); err != nil {
					return nil, err
				}
			}
		}
		out = append(out, obj)
	}
	return out, nil
}

// rewritePodSpec points the containers at registry/name:tag with the pull
// policy, and the DaemonSet's host paths at the settings.
func rewritePodSpec(obj *unstructured.Unstructured, registry, tag string, set map[string]string) error {
	containers, _, err := unstructured.NestedSlice(obj.Object, "spec", "template", "spec", "containers")
	if err != nil {
		return err
	}
	var mountPaths = map[string]string{} // volume name -> new path for mounts that mirror the host
	hostPaths := map[string]string{
		"cni-bin":          set["cniBinDir"],
		"cni-conf":         set["cniConfDir"],
		"netns":            set["netnsDir"],
		"containerd-netns": set["containerdNetnsDir"],
	}
	// The netns dirs are mounted at the host's own path: the runtime
	// hands the agent host paths in CNI_NETNS.
	mountPaths["netns"], mountPaths["containerd-netns"] = set["netnsDir"], set["containerdNetnsDir"]
	for i, c := range containers {
		cm := c.(map[string]any)
		image, _ := cm["image"].(string)
		name, err := imageName(image)
		if err != nil {
			return err
		}
		cm["image"] = registry + "/" + name + ":" + tag
		cm["imagePullPolicy"] = set["imagePullPolicy"]
		mounts, _, _ := unstructured.NestedSlice(cm, "volumeMounts")
		for _, m := range mounts {
			mm := m.(map[string]any)
			if p, ok := mountPaths[mm["name"].(string)]; ok {
				mm["mountPath"] = p
			}
		}
		if len(mounts) > 0 {
			cm["volumeMounts"] = mounts
		}
		containers[i] = cm
	}
	if err := unstructured.SetNestedSlice(obj.Object, containers, "spec", "template", "spec", "containers"); err != nil {
		return err
	}
	if obj.GetKind() != "DaemonSet" {
		return nil
	}
	volumes, _, err := unstructured.NestedSlice(obj.Object, "spec", "template", "spec", "volumes")
	if err != nil {
		return err
	}
	for _, v := range volumes {
		vm := v.(map[string]any)
		if p, ok := hostPaths[vm["name"].(string)]; ok {
			if err := unstructured.SetNestedField(vm, p, "hostPath", "path"); err != nil {
				return err
			}
		}
	}
	return unstructured.SetNestedSlice(obj.Object, volumes, "spec", "template", "spec", "volumes")
}

// imageName returns the last path element of an image reference without
// tag or digest: ghcr.io/tunmesh/tunmesh-node:dev -> tunmesh-node.
func imageName(ref string) (string, error) {
	name := ref[strings.LastIndexByte(ref, '/')+1:]
	name, _, _ = strings.Cut(name, "@")
	name, _, _ = strings.Cut(name, ":")
	if !strings.HasPrefix(name, "tunmesh-") {
		return "", fmt.Errorf("image %q is not a tunmesh image", ref)
	}
	return name, nil
}

// identityObjects returns the trust anchors ConfigMap and, unless the
// issuer is external, a generated issuer Secret.
func identityObjects(o Options, trustDomain string) ([]*unstructured.Unstructured, error) {
	anchorsPEM := o.TrustAnchorsPEM
	var secret *unstructured.Unstructured
	switch {
	case o.ExternalIssuer && len(anchorsPEM) == 0:
		return nil, fmt.Errorf("%w: --identity-external-issuer needs --identity-trust-anchors FILE (the PEM trust anchors your issuer chains to); "+
			"without an external issuer, leave both out and tunmeshctl generates an anchor and an issuer", ErrNoIssuer)
	case !o.ExternalIssuer && len(anchorsPEM) > 0:
		return nil, fmt.Errorf("%w: --identity-trust-anchors needs --identity-external-issuer (a generated issuer is signed by a generated anchor)", ErrNoIssuer)
	case o.ExternalIssuer:
		if _, err := ca.ParseAnchors(anchorsPEM); err != nil {
			return nil, fmt.Errorf("trust anchors: %w", err)
		}
	case o.Existing != nil && o.Existing.Issuer != nil:
		pem, issuer, err := o.Existing.reuse()
		if err != nil {
			return nil, fmt.Errorf("%w (delete it to have a new one generated, or use --identity-external-issuer)", err)
		}
		anchorsPEM = pem
		secret = object("v1", "Secret", deploy.IssuerSecretName)
		secret.Object["type"] = "kubernetes.io/tls"
		caCrt := issuer["ca.crt"]
		if len(caCrt) == 0 {
			caCrt = pem
		}
		secret.Object["stringData"] = map[string]any{
			"ca.crt":  string(caCrt),
			"tls.crt": string(issuer["tls.crt"]),
			"tls.key": string(issuer["tls.key"]),
		}
	default:
		m, err := identitycli.Generate(identitycli.BootstrapOptions{TrustDomain: trustDomain, SecretNamespace: deploy.Namespace, SecretName: deploy.IssuerSecretName, Now: o.Now})
		if err != nil {
			return nil, err
		}
		anchorsPEM = m.AnchorPEM
		secret = object("v1", "Secret", deploy.IssuerSecretName)
		secret.Object["type"] = "kubernetes.io/tls"
		// stringData keeps the PEM readable in the printed manifest.
		secret.Object["stringData"] = map[string]any{
			"ca.crt":  string(m.AnchorPEM),
			"tls.crt": string(m.IssuerPEM),
			"tls.key": string(m.IssuerKeyPEM),
		}
	}
	anchors := object("v1", "ConfigMap", deploy.TrustAnchorsName)
	anchors.Object["data"] = map[string]any{"ca.crt": string(anchorsPEM)}
	out := []*unstructured.Unstructured{anchors}
	if secret != nil {
		out = append(out, secret)
	}
	return out, nil
}

func object(apiVersion, kind, name string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{}}
	u.SetAPIVersion(apiVersion)
	u.SetKind(kind)
	u.SetName(name)
	u.SetNamespace(deploy.Namespace)
	u.SetLabels(map[string]string{"app.kubernetes.io/part-of": "tunmesh"})
	return u
}

// Write prints objects as a YAML stream ("yaml") or a v1 List ("json"),
// both of which `kubectl apply -f -` reads.
func Write(w io.Writer, objs []*unstructured.Unstructured, format string) error {
	switch format {
	case "yaml":
		for i, o := range objs {
			b, err := yaml.Marshal(o.Object)
			if err != nil {
				return fmt.Errorf("%s %s: %w", o.GetKind(), o.GetName(), err)
			}
			sep := "---\n"
			if i == 0 {
				sep = ""
			}
			if _, err := fmt.Fprintf(w, "%s# %s %s\n%s", sep, o.GetKind(), o.GetName(), b); err != nil {
				return err
			}
		}
		return nil
	case "json":
		items := make([]any, 0, len(objs))
		for _, o := range objs {
			items = append(items, o.Object)
		}
		b, err := json.MarshalIndent(map[string]any{"apiVersion": "v1", "kind": "List", "items": items}, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	return fmt.Errorf("unknown output format %q", format)
}

// Formats are the output formats Write knows.
var Formats = []string{"yaml", "json"}
