// Package identitycli is the logic behind tunmeshctl's identity commands:
// bootstrapping a development trust anchor and issuer, inspecting
// certificates, and the identity part of `tunmeshctl check`. It does no
// flag parsing and never exits, so the commands stay thin and the logic is
// tested here.
package identitycli

import (
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// Bootstrap defaults.
const (
	DefaultAnchorValidity  = 365 * 24 * time.Hour
	DefaultIssuerValidity  = 180 * 24 * time.Hour
	DefaultSecretNamespace = "tunmesh"
	DefaultSecretName      = "tunmesh-identity-issuer"
)

// Files written by Bootstrap. The first four follow cert-manager's Secret
// layout (plus the anchor key, which cert-manager would keep elsewhere).
const (
	AnchorCertFile = ca.AnchorsFile // ca.crt
	AnchorKeyFile  = "ca.key"
	IssuerCertFile = ca.CertFile // tls.crt
	IssuerKeyFile  = ca.KeyFile  // tls.key
	SecretFile     = "issuer-secret.yaml"
)

// BootstrapOptions configures Bootstrap. Zero fields take the defaults.
type BootstrapOptions struct {
	// Dir receives the files; it is created if missing.
	Dir string
	// TrustDomain names the mesh (default "cluster.local"); it appears in
	// the certificates' names.
	TrustDomain string
	// AnchorValidity and IssuerValidity default to 365 and 180 days. The
	// issuer may not outlive the anchor.
	AnchorValidity, IssuerValidity time.Duration
	// SecretNamespace and SecretName name the issuer Secret (defaults
	// "tunmesh" and "tunmesh-identity-issuer"). The namespace is also the
	// control namespace in the certificates' names.
	SecretNamespace, SecretName string
	// Force overwrites existing files; without it Bootstrap writes nothing
	// if any of its files exists.
	Force bool
	// Now is the start of validity; zero means time.Now().
	Now time.Time
}

// Result describes what Bootstrap wrote.
type Result struct {
	// Paths are the files written, in order: ca.crt, ca.key, tls.crt,
	// tls.key, issuer-secret.yaml.
	Paths []string
	// Anchor and Issuer are the new certificates.
	Anchor, Issuer *x509.Certificate
}

func (o BootstrapOptions) withDefaults() BootstrapOptions {
	if o.TrustDomain == "" {
		o.TrustDomain = ca.DefaultTrustDomain
	}
	if o.AnchorValidity == 0 {
		o.AnchorValidity = DefaultAnchorValidity
	}
	if o.IssuerValidity == 0 {
		o.IssuerValidity = DefaultIssuerValidity
	}
	if o.SecretNamespace == "" {
		o.SecretNamespace = DefaultSecretNamespace
	}
	if o.SecretName == "" {
		o.SecretName = DefaultSecretName
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	return o
}

func (o BootstrapOptions) validate() error {
	if o.Dir == "" {
		return errors.New("no output directory")
	}
	return o.validateNames()
}

// validateNames checks everything but Dir.
func (o BootstrapOptions) validateNames() error {
	// A namespace is a DNS-1123 label and a Secret name a DNS-1123
	// subdomain: exactly the rules for a SPIFFE ID's namespace and
	// ServiceAccount, so let package spiffe check them (which also keeps
	// the YAML below free of anything that would need quoting).
	if err := spiffe.ValidateTrustDomain(o.TrustDomain); err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	probe := spiffe.ID{TrustDomain: o.TrustDomain, Namespace: o.SecretNamespace, ServiceAccount: o.SecretName}
	if err := probe.Validate(); err != nil {
		return fmt.Errorf("secret namespace/name %s/%s: %w", o.SecretNamespace, o.SecretName, err)
	}
	if o.AnchorValidity < 0 || o.IssuerValidity < 0 {
		return errors.New("negative validity")
	}
	if o.IssuerValidity > o.AnchorValidity {
		return fmt.Errorf("issuer validity %s exceeds anchor validity %s", o.IssuerValidity, o.AnchorValidity)
	}
	return nil
}

// Bootstrap creates a trust anchor and an issuer under it and writes them to
// o.Dir as ca.crt (0644), ca.key, tls.crt, tls.key and issuer-secret.yaml
// (a kubernetes.io/tls Secret in cert-manager layout), the last three with
// keys in them and so 0600. Without o.Force it refuses, before writing
// anything, if any of the files exists (the error wraps fs.ErrExist), and
// removes what it wrote if a later write fails.
//
// This is for development clusters and tests; production trust anchors
// should be kept offline and issuers managed by cert-manager.
func Bootstrap(o BootstrapOptions) (Result, error) {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return Result{}, fmt.Errorf("bootstrap identity: %w", err)
	}
	if !o.Force {
		var existing []string
		for _, name := range []string{AnchorCertFile, AnchorKeyFile, IssuerCertFile, IssuerKeyFile, SecretFile} {
			if _, err := os.Lstat(filepath.Join(o.Dir, name)); err == nil {
				existing = append(existing, name)
			}
		}
		if len(existing) > 0 {
			return Result{}, fmt.Errorf("bootstrap identity in %q: %w: refusing to overwrite %s",
				o.Dir, fs.ErrExist, strings.Join(existing, ", "))
		}
	}

	m, err := generate(o)
	if err != nil {
		return Result{}, fmt.Errorf("bootstrap identity: %w", err)
	}
	anchor, issuer := m.Anchor, m.Issuer
	anchorPEM, anchorKeyPEM, issuerPEM, issuerKeyPEM := m.AnchorPEM, m.AnchorKeyPEM, m.IssuerPEM, m.IssuerKeyPEM

	files := []struct {
		name string
		data []byte
		mode fs.FileMode
	}{
		{AnchorCertFile, anchorPEM, 0o644},
		{AnchorKeyFile, anchorKeyPEM, 0o600},
		{IssuerCertFile, issuerPEM, 0o644},
		{IssuerKeyFile, issuerKeyPEM, 0o600},
		{SecretFile, secretYAML(o.SecretNamespace, o.SecretName, anchorPEM, issuerPEM, issuerKeyPEM), 0o600},
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return Result{}, fmt.Errorf("bootstrap identity: %w", err)
	}
	res := Result{Anchor: anchor, Issuer: issuer}
	success := false
	defer func() {
		if !success && !o.Force {
			// Leave the directory as we found it. With Force the old
			// files are gone already; half a new set is no worse.
			for _, p := range res.Paths {
				os.Remove(p)
			}
		}
	}()
	for _, f := range files {
		path := filepath.Join(o.Dir, f.name)
		if err := writeFile(path, f.data, f.mode, o.Force); err != nil {
			return Result{}, fmt.Errorf("bootstrap identity: %w", err)
		}
		res.Paths = append(res.Paths, path)
	}
	success = true
	return res, nil
}

// writeFile writes data to path with exactly mode (whatever the umask or
// the mode of a file it replaces). With overwrite it replaces path
// atomically; without, it fails if path exists, even if the file appeared
// after Bootstrap looked.
func writeFile(path string, data []byte, mode fs.FileMode, overwrite bool) (err error) {
	var f *os.File
	if overwrite {
		f, err = os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	} else {
		f, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	}
	if err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	name := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(name)
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if overwrite {
		if err := os.Rename(name, path); err != nil {
			return fmt.Errorf("write %q: %w", path, err)
		}
	}
	return nil
}

// secretYAML renders the issuer Secret as cert-manager would have created
// it. Names were validated as DNS-1123, so they need no quoting.
func secretYAML(namespace, name string, anchorPEM, issuerPEM, issuerKeyPEM []byte) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `# Generated by tunmeshctl identity bootstrap, for development only.
# Production issuers are managed by cert-manager in this same layout.
apiVersion: v1
kind: Secret
metadata:
  name: %s
  namespace: %s
  labels:
    app.kubernetes.io/part-of: tunmesh
type: kubernetes.io/tls
data:
  ca.crt: %s
  tls.crt: %s
  tls.key: %s
`, name, namespace, b64(anchorPEM), b64(issuerPEM), b64(issuerKeyPEM))
}

// Material is a new trust anchor and an issuer under it, as certificates
// and PEM.
type Material struct {
	Anchor, Issuer                                   *x509.Certificate
	AnchorPEM, AnchorKeyPEM, IssuerPEM, IssuerKeyPEM []byte
}

// Generate creates a trust anchor and an issuer under it in memory, as
// Bootstrap does (o.Dir and o.Force are ignored), checked by loading them
// the way the identity service will.
func Generate(o BootstrapOptions) (Material, error) {
	o = o.withDefaults()
	if err := o.validateNames(); err != nil {
		return Material{}, fmt.Errorf("generate identity: %w", err)
	}
	m, err := generate(o)
	if err != nil {
		return Material{}, fmt.Errorf("generate identity: %w", err)
	}
	return m, nil
}

func generate(o BootstrapOptions) (Material, error) {
	// Names in the style of Linkerd's (root.linkerd.cluster.local,
	// identity.linkerd.cluster.local): the issuer's name is the parent
	// domain of every leaf's DNS SAN.
	anchor, anchorKey, err := ca.NewRoot("root."+o.SecretNamespace+"."+o.TrustDomain, o.AnchorValidity, o.Now)
	if err != nil {
		return Material{}, err
	}
	issuer, issuerKey, err := ca.NewIntermediate(anchor, anchorKey, "identity."+o.SecretNamespace+"."+o.TrustDomain, o.IssuerValidity, o.Now)
	if err != nil {
		return Material{}, err
	}
	anchorPEM, issuerPEM := ca.EncodeCertPEM(anchor), ca.EncodeCertPEM(issuer)
	anchorKeyPEM, err := ca.EncodeKeyPEM(anchorKey)
	if err != nil {
		return Material{}, err
	}
	issuerKeyPEM, err := ca.EncodeKeyPEM(issuerKey)
	if err != nil {
		return Material{}, err
	}
	// Load what we are about to write the way the identity service will,
	// so a bad combination fails here rather than in the cluster.
	anchors, err := ca.ParseAnchors(anchorPEM)
	if err != nil {
		return Material{}, err
	}
	if _, err := ca.ParseIssuer(issuerPEM, issuerKeyPEM, anchors, o.Now); err != nil {
		return Material{}, err
	}

	return Material{Anchor: anchor, Issuer: issuer, AnchorPEM: anchorPEM, AnchorKeyPEM: anchorKeyPEM, IssuerPEM: issuerPEM, IssuerKeyPEM: issuerKeyPEM}, nil
}
