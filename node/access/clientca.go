package access

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/rbac"
)

// The ConfigMap where the API server publishes its client CA for
// aggregated API servers (and anything else that authenticates the
// cluster's client certificates without being configured).
const (
	ClientCANamespace = "kube-system"
	ClientCAConfigMap = "extension-apiserver-authentication"
	ClientCAKey       = "client-ca-file"
)

// ErrNoClientCA: the PEM holds no certificate.
var ErrNoClientCA = errors.New("no CA certificate")

// ClientCAs is the current pool of client CAs, swapped as a whole when the
// cluster's CA changes (a rotation). The zero value accepts no
// certificates.
type ClientCAs struct {
	pool atomic.Pointer[x509.CertPool]
	pem  atomic.Pointer[string]
}

// Pool returns the current CAs (nil: none).
func (c *ClientCAs) Pool() *x509.CertPool { return c.pool.Load() }

// SetPEM replaces the CAs with the certificates of pem; it reports whether
// they changed. Without any certificate the old pool stays.
func (c *ClientCAs) SetPEM(pem []byte) (bool, error) {
	if old := c.pem.Load(); old != nil && *old == string(pem) {
		return false, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return false, ErrNoClientCA
	}
	s := string(pem)
	c.pool.Store(pool)
	c.pem.Store(&s)
	return true, nil
}

// Refresh reads the cluster's client CA from
// kube-system/extension-apiserver-authentication.
func (c *ClientCAs) Refresh(ctx context.Context, client kubernetes.Interface) (bool, error) {
	cm, err := client.CoreV1().ConfigMaps(ClientCANamespace).Get(ctx, ClientCAConfigMap, metav1.GetOptions{})
	if err != nil {
		return false, fmt.Errorf("read %s/%s: %w", ClientCANamespace, ClientCAConfigMap, err)
	}
	pem, ok := cm.Data[ClientCAKey]
	if !ok {
		return false, fmt.Errorf("%s/%s has no %s (the API server runs without --client-ca-file): %w", ClientCANamespace, ClientCAConfigMap, ClientCAKey, ErrNoClientCA)
	}
	changed, err := c.SetPEM([]byte(pem))
	if err != nil {
		return false, fmt.Errorf("%s/%s %s: %w", ClientCANamespace, ClientCAConfigMap, ClientCAKey, err)
	}
	return changed, nil
}

// ClientCARefresh is how often Follow re-reads the ConfigMap: a rotated
// client CA is accepted within this time.
const ClientCARefresh = time.Minute

// Follow keeps c equal to the cluster's client CA, re-reading it every
// interval until ctx ends. A failed read keeps the last CAs (a CA does not
// stop being valid because the API is briefly away).
func (c *ClientCAs) Follow(ctx context.Context, client kubernetes.Interface, interval time.Duration, log *slog.Logger) {
	for {
		changed, err := c.Refresh(ctx, client)
		switch {
		case err != nil && apierrors.IsNotFound(err):
			log.Warn("the cluster publishes no client CA: observability API callers need a token", "err", err)
		case err != nil:
			log.Warn("read the cluster's client CA (keeping the last one)", "err", err)
		case changed:
			log.Info("observability API accepts client certificates of the cluster's client CA", "configmap", ClientCANamespace+"/"+ClientCAConfigMap)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// ClientCAPermissions are the calls Follow makes.
func ClientCAPermissions() []rbac.Permission {
	return []rbac.Permission{{Resource: "configmaps", Verb: "get", Namespace: ClientCANamespace, Name: ClientCAConfigMap}}
}
