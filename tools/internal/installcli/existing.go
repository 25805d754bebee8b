package installcli

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/identity/ca"
)

// Existing is the identity material of an installation already on the
// cluster. Re-running install (an upgrade: new tag, new settings) keeps it:
// a new trust anchor would make every agent distrust every other until all
// had restarted.
type Existing struct {
	// AnchorsPEM from the trust anchors ConfigMap (may be empty).
	AnchorsPEM []byte
	// Issuer is the issuer Secret's data (ca.crt, tls.crt, tls.key), or
	// nil when there is none.
	Issuer map[string][]byte
	// Settings are the --set values the installed manifests were rendered
	// with (SettingsAnnotation on the settings ConfigMap); nil when none.
	Settings map[string]string
}

// SettingsAnnotation on the settings ConfigMap records the --set values of
// the install that wrote it, so that an upgrade keeps them.
const SettingsAnnotation = "tunmesh.io/install-settings"

// ReadExisting reads the trust anchors ConfigMap and the issuer Secret;
// nil when neither exists.
func ReadExisting(ctx context.Context, client kubernetes.Interface) (*Existing, error) {
	var e Existing
	cm, err := client.CoreV1().ConfigMaps(deploy.Namespace).Get(ctx, deploy.TrustAnchorsName, metav1.GetOptions{})
	switch {
	case err == nil:
		e.AnchorsPEM = []byte(cm.Data[ca.AnchorsFile])
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read %s/%s: %w", deploy.Namespace, deploy.TrustAnchorsName, err)
	}
	sec, err := client.CoreV1().Secrets(deploy.Namespace).Get(ctx, deploy.IssuerSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		e.Issuer = sec.Data
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read %s/%s: %w", deploy.Namespace, deploy.IssuerSecretName, err)
	}
	cfg, err := client.CoreV1().ConfigMaps(deploy.Namespace).Get(ctx, deploy.ConfigMapName, metav1.GetOptions{})
	switch {
	case err == nil:
		if a, ok := cfg.Annotations[SettingsAnnotation]; ok {
			var set map[string]string
			if err := json.Unmarshal([]byte(a), &set); err != nil {
				return nil, fmt.Errorf("%s/%s annotation %s: %w", deploy.Namespace, deploy.ConfigMapName, SettingsAnnotation, err)
			}
			// Keep only what this version still knows and accepts.
			pairs := make([]string, 0, len(set))
			for k, v := range set {
				pairs = append(pairs, k+"="+v)
			}
			sort.Strings(pairs)
			var kept []string
			for _, p := range pairs {
				if _, err := ParseSettings([]string{p}); err == nil {
					kept = append(kept, p)
				}
			}
			e.Settings, _ = ParseSettings(kept)
		}
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read %s/%s: %w", deploy.Namespace, deploy.ConfigMapName, err)
	}
	if len(e.AnchorsPEM) == 0 && e.Issuer == nil && e.Settings == nil {
		return nil, nil
	}
	return &e, nil
}

// MergeSettings returns the installed settings overridden by the new ones.
func MergeSettings(installed, given map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range installed {
		out[k] = v
	}
	for k, v := range given {
		out[k] = v
	}
	return out
}

// reuse returns the existing issuer and anchors if they form a usable
// pair: the issuer loads and chains to the anchors.
func (e *Existing) reuse() (anchorsPEM []byte, issuer map[string][]byte, err error) {
	if e == nil || e.Issuer == nil {
		return nil, nil, nil
	}
	anchorsPEM = e.AnchorsPEM
	if len(anchorsPEM) == 0 {
		anchorsPEM = e.Issuer[ca.AnchorsFile]
	}
	anchors, err := ca.ParseAnchors(anchorsPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("existing trust anchors: %w", err)
	}
	if _, err := ca.ParseIssuer(e.Issuer[corev1.TLSCertKey], e.Issuer[corev1.TLSPrivateKeyKey], anchors, timeNow()); err != nil {
		return nil, nil, fmt.Errorf("existing issuer %s/%s does not load with the trust anchors: %w", deploy.Namespace, deploy.IssuerSecretName, err)
	}
	return anchorsPEM, e.Issuer, nil
}
