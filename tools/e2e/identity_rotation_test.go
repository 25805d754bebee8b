package e2e

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/service"
	"github.com/tunmesh/tunmesh/identity/workload"
)

func TestIdentityRefusesToStartWithoutPermissions(t *testing.T) {
	e := identity(t)
	nobody, err := e.c.Impersonating("system:serviceaccount:tunmesh:nobody")
	if err != nil {
		t.Fatal(err)
	}
	authority, err := ca.New(ca.Config{TrustDomain: trustDom, ControlNamespace: controlNS}, e.svc.CA().Issuer(), e.anchors)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(service.Config{}, nobody, authority, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	svc.Listener(ln)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = svc.Run(ctx)
	if !errors.Is(err, service.ErrMissingPermission) || !strings.Contains(err.Error(), "create tokenreviews.authentication.k8s.io") {
		t.Fatalf("Run without RBAC: got %v, want ErrMissingPermission naming tokenreviews", err)
	}
}

func TestIdentityIssuerRotation(t *testing.T) {
	e := identity(t)
	ctx := context.Background()
	agent := e.client(t, e.token(t, controlNS, "tunmesh-node", e.agentPods["node-1"], api.Audience))
	issuedBy := func() string {
		t.Helper()
		chain, err := agent.Certify(ctx, e.web, csr(t))
		if err != nil {
			t.Fatalf("certify: %v", err)
		}
		leaf, err := x509.ParseCertificate(chain[0])
		if err != nil {
			t.Fatal(err)
		}
		return leaf.Issuer.CommonName
	}
	start := time.Now()
	// Tests share the issuer Secret; whatever issuer is in use now, a
	// renewal (as cert-manager does it) must take over without a restart.
	before := issuedBy()
	if before == "issuer-2" {
		t.Fatalf("unexpected starting issuer %q", before)
	}
	_, sec2, err := e.newIssuer("issuer-2", e.rootCert, e.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	e.updateIssuerSecret(t, sec2)
	waitFor(t, 30*time.Second, "leaves from issuer-2", func() error {
		if got := issuedBy(); got != "issuer-2" {
			return fmt.Errorf("issued by %q", got)
		}
		return nil
	})
	e.waitEvent(t, service.EventIssuerUpdated, "issuer-2", start)

	// An issuer from a foreign root is refused; issuer-2 stays in use.
	otherRoot, otherKey, err := ca.NewRoot("foreign root", 365*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.NewIntermediate(otherRoot, otherKey, "issuer-evil", 180*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	bad := sec2.DeepCopy()
	bad.Data[corev1.TLSCertKey], bad.Data[corev1.TLSPrivateKeyKey] = ca.EncodeCertPEM(cert), keyPEM
	badAt := time.Now()
	e.updateIssuerSecret(t, bad)
	e.waitEvent(t, service.EventIssuerUpdateSkipped, "not signed by", badAt)
	if got := issuedBy(); got != "issuer-2" {
		t.Fatalf("after an invalid issuer update, leaf issued by %q, want issuer-2", got)
	}
}

func (e *idEnv) updateIssuerSecret(t *testing.T, sec *corev1.Secret) {
	t.Helper()
	secrets := e.c.Client.CoreV1().Secrets(controlNS)
	cur, err := secrets.Get(context.Background(), sec.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Data = sec.Data
	if _, err := secrets.Update(context.Background(), cur, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update issuer secret: %v", err)
	}
}

// waitEvent waits for an event with reason on the issuer Secret whose
// message contains substr, recorded at or after since (second precision).
func (e *idEnv) waitEvent(t *testing.T, reason, substr string, since time.Time) {
	t.Helper()
	waitFor(t, 30*time.Second, "event "+reason, func() error {
		list, err := e.c.Client.CoreV1().Events(controlNS).List(context.Background(), metav1.ListOptions{
			FieldSelector: fields.Set{"reason": reason, "involvedObject.name": "tunmesh-identity-issuer"}.String(),
		})
		if err != nil {
			return err
		}
		for _, ev := range list.Items {
			if strings.Contains(ev.Message, substr) && !eventTime(ev).Before(since.Truncate(time.Second)) {
				return nil
			}
		}
		return fmt.Errorf("%d %s events, none mentions %q", len(list.Items), reason, substr)
	})
}

func eventTime(ev corev1.Event) time.Time {
	if !ev.LastTimestamp.IsZero() {
		return ev.LastTimestamp.Time
	}
	if !ev.EventTime.IsZero() {
		return ev.EventTime.Time
	}
	return ev.CreationTimestamp.Time
}

// TestWorkloadCertificateRefresh: with 30 s leaves the manager renews
// before expiry; with the identity service down it keeps serving the
// current certificate and counts errors; it recovers when the service
// returns.
func TestWorkloadCertificateRefresh(t *testing.T) {
	e := identity(t)
	// A second service with short leaves on a port of its own.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	short := *e
	if err := short.startService(ln, e.svc.CA().Issuer(), ca.Config{TrustDomain: trustDom, ControlNamespace: controlNS, Lifetime: 30 * time.Second, ClockSkew: 5 * time.Second}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = short.stopService() }()
	short.addr = addr
	client := short.client(t, e.token(t, controlNS, "tunmesh-node", e.agentPods["node-1"], api.Audience))

	reg := prometheus.NewRegistry()
	mgr, err := workload.NewManager(workload.ManagerConfig{MinBackoff: 500 * time.Millisecond, MaxBackoff: 2 * time.Second}, client, e.anchors.Pool(), reg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Run(ctx) }()
	defer func() { cancel(); <-done }()
	mgr.Acquire(e.web)

	first := currentCert(t, mgr, e)
	// Lifetime 35 s (30 s + 5 s skew): renewal at 70% is ~19.5 s after issuance.
	waitFor(t, 40*time.Second, "a renewed certificate", func() error {
		c := currentCert(t, mgr, e)
		if c.SerialNumber.Cmp(first.SerialNumber) == 0 {
			return errors.New("still the first certificate")
		}
		if time.Now().After(first.NotAfter) {
			return fmt.Errorf("renewed only after the first expired at %s", first.NotAfter)
		}
		return nil
	})
	second := currentCert(t, mgr, e)

	// Identity service down: the manager keeps the current certificate.
	if err := short.stopService(); err != nil {
		t.Fatalf("stop service: %v", err)
	}
	errorsBefore := counterValue(t, reg, "tunmesh_workload_certificate_refreshes_total", "error")
	waitFor(t, 40*time.Second, "refresh errors while the service is down", func() error {
		if n := counterValue(t, reg, "tunmesh_workload_certificate_refreshes_total", "error"); n < errorsBefore+2 {
			return fmt.Errorf("%v refresh errors", n)
		}
		return nil
	})
	if c := currentCert(t, mgr, e); c.SerialNumber.Cmp(second.SerialNumber) != 0 {
		t.Fatalf("certificate changed while the service was down")
	}
	if mgr.LastError(e.web) == nil {
		t.Fatalf("LastError is nil while the service is down")
	}

	// The service returns on the same address: the manager recovers.
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := short.startService(ln2, e.svc.CA().Issuer(), ca.Config{TrustDomain: trustDom, ControlNamespace: controlNS, Lifetime: 30 * time.Second, ClockSkew: 5 * time.Second}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "recovery", func() error {
		if c := currentCert(t, mgr, e); c.SerialNumber.Cmp(second.SerialNumber) == 0 {
			return errors.New("no new certificate yet")
		}
		return mgr.LastError(e.web)
	})
}

func currentCert(t *testing.T, mgr *workload.Manager, e *idEnv) *x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := mgr.Certificate(ctx, e.web)
	if err != nil {
		t.Fatal(err)
	}
	return c.Leaf
}

// counterValue reads a counter with label result=value from reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name, result string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{result=%q} not found", name, result)
	return 0
}
