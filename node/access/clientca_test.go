package access

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func testCAPEM(t *testing.T, cn string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestClientCAsFromConfigMap: the pool is read from
// kube-system/extension-apiserver-authentication, follows a rotation, and
// keeps the last CAs when the ConfigMap goes bad.
func TestClientCAsFromConfigMap(t *testing.T) {
	ctx := context.Background()
	var c ClientCAs
	if c.Pool() != nil {
		t.Fatal("zero ClientCAs accepts certificates")
	}
	client := fake.NewClientset()
	if _, err := c.Refresh(ctx, client); err == nil {
		t.Fatal("no ConfigMap: no error")
	}
	first := testCAPEM(t, "ca-1")
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ClientCANamespace, Name: ClientCAConfigMap}, Data: map[string]string{ClientCAKey: string(first)}}
	if _, err := client.CoreV1().ConfigMaps(ClientCANamespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if changed, err := c.Refresh(ctx, client); err != nil || !changed || c.Pool() == nil {
		t.Fatalf("first read: changed %v, err %v", changed, err)
	}
	p1 := c.Pool()
	if changed, err := c.Refresh(ctx, client); err != nil || changed || c.Pool() != p1 {
		t.Fatalf("unchanged ConfigMap: changed %v, err %v", changed, err)
	}
	cm.Data[ClientCAKey] = string(testCAPEM(t, "ca-2"))
	if _, err := client.CoreV1().ConfigMaps(ClientCANamespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if changed, err := c.Refresh(ctx, client); err != nil || !changed || c.Pool() == p1 {
		t.Fatalf("rotation: changed %v, err %v", changed, err)
	}
	p2 := c.Pool()
	cm.Data[ClientCAKey] = "garbage"
	if _, err := client.CoreV1().ConfigMaps(ClientCANamespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Refresh(ctx, client); !errors.Is(err, ErrNoClientCA) || c.Pool() != p2 {
		t.Fatalf("bad PEM: err %v, pool kept %v", err, c.Pool() == p2)
	}
}
