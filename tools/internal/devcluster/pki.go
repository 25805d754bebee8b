package devcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki holds the cluster's certificates: one CA that signs the API server's
// serving certificate and every client certificate, plus the service-account
// signing key used for (projected) tokens.
type pki struct {
	dir string
}

func (p pki) file(name string) string { return filepath.Join(p.dir, name) }

func (p pki) caCert() string             { return p.file("ca.crt") }
func (p pki) caKey() string              { return p.file("ca.key") }
func (p pki) apiCert() string            { return p.file("apiserver.crt") }
func (p pki) apiKey() string             { return p.file("apiserver.key") }
func (p pki) saKey() string              { return p.file("sa.key") }
func (p pki) saPub() string              { return p.file("sa.pub") }
func (p pki) clientCert(u string) string { return p.file(u + ".crt") }
func (p pki) clientKey(u string) string  { return p.file(u + ".key") }

// clientIdentity is a client certificate to issue: CN user, O groups.
type clientIdentity struct{ user, group string }

// generate writes a fresh PKI. Everything is ECDSA P-256 and valid for a
// year. extra are client certificates beyond the admin and the
// controller-manager (the real nodes' kubelets, the API server's kubelet
// client, kube-scheduler).
func (p pki) generate(hosts []string, ips []net.IP, extra ...clientIdentity) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return fmt.Errorf("create pki dir: %w", err)
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate ca key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "tunmesh-dev-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("create ca cert: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("parse ca cert: %w", err)
	}
	if err := writeCert(p.caCert(), caDER); err != nil {
		return err
	}
	if err := writeKey(p.caKey(), caKey); err != nil {
		return err
	}

	leaf := func(certPath, keyPath string, tmpl *x509.Certificate) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate key for %s: %w", tmpl.Subject.CommonName, err)
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore = now.Add(-time.Hour)
		tmpl.NotAfter = now.Add(365 * 24 * time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("create cert for %s: %w", tmpl.Subject.CommonName, err)
		}
		if err := writeCert(certPath, der); err != nil {
			return err
		}
		return writeKey(keyPath, key)
	}
	if err := leaf(p.apiCert(), p.apiKey(), &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    hosts,
		IPAddresses: ips,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return err
	}
	for _, c := range append([]clientIdentity{
		{adminUser, "system:masters"},
		{controllerManagerUser, ""},
	}, extra...) {
		subj := pkix.Name{CommonName: c.user}
		if c.group != "" {
			subj.Organization = []string{c.group}
		}
		if err := leaf(p.clientCert(c.user), p.clientKey(c.user), &x509.Certificate{
			Subject:     subj,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}); err != nil {
			return err
		}
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate service-account key: %w", err)
	}
	if err := writeKey(p.saKey(), saKey); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return fmt.Errorf("marshal service-account public key: %w", err)
	}
	return writePEM(p.saPub(), "PUBLIC KEY", pub, 0o644)
}

const (
	adminUser             = "tunmesh-dev-admin"
	controllerManagerUser = "system:kube-controller-manager"
	schedulerUser         = "system:kube-scheduler"
	// kubeletClientUser is the API server's identity towards kubelets
	// (kubectl logs/exec/port-forward); bound to system:kubelet-api-admin.
	kubeletClientUser = "tunmesh-dev-apiserver-kubelet-client"
)

// nodeUser is a real node's kubelet identity (the Node authorizer's form).
func nodeUser(node string) string { return "system:node:" + node }

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}

func writeCert(path string, der []byte) error { return writePEM(path, "CERTIFICATE", der, 0o644) }

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key %s: %w", path, err)
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for user at server, embedding paths to
// the CA and the user's client certificate. A non-empty as impersonates
// that user (the admin certificate acting as a ServiceAccount, so a
// component runs with that account's RBAC).
func (p pki) writeKubeconfig(path, server, user, as string) error {
	const tmpl = `apiVersion: v1
kind: Config
clusters:
- name: tunmesh-dev
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    client-certificate: %s
    client-key: %s%s
contexts:
- name: tunmesh-dev
  context:
    cluster: tunmesh-dev
    user: %s
current-context: tunmesh-dev
`
	impersonate := ""
	if as != "" {
		impersonate = "\n    as: " + as
	}
	b := fmt.Sprintf(tmpl, server, p.caCert(), user, p.clientCert(user), p.clientKey(user), impersonate, user)
	if err := os.WriteFile(path, []byte(b), 0o600); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

// ImpersonatingKubeconfig writes a kubeconfig for a running cluster whose
// admin certificate acts as user, reaching the API from the host.
func ImpersonatingKubeconfig(cfg Config, st *State, path, user string) error {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return err
	}
	return pki{dir: cfg.path("pki")}.writeKubeconfig(path, "https://"+st.APIServer, adminUser, user)
}
