package workload

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// caCertifier signs CSRs with an in-process CA: the identity service
// without the API around it.
type caCertifier struct{ ca *ca.CA }

func (c caCertifier) Certify(_ context.Context, id spiffe.ID, csr []byte) ([][]byte, error) {
	return c.ca.Sign(csr, id, time.Now())
}

type hierarchy struct {
	anchorsPEM []byte
	anchors    *ca.Anchors
	ca         *ca.CA
}

func newHierarchy(t *testing.T, name string) hierarchy {
	t.Helper()
	now := time.Now()
	root, rootKey, err := ca.NewRoot(name+" root", 365*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.NewIntermediate(root, rootKey, name+" issuer", 180*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	pemBytes := ca.EncodeCertPEM(root)
	anchors, err := ca.ParseAnchors(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.New(ca.Config{}, &ca.Issuer{Certificate: cert, Key: key}, anchors)
	if err != nil {
		t.Fatal(err)
	}
	return hierarchy{anchorsPEM: pemBytes, anchors: anchors, ca: c}
}

func TestVerifyChains(t *testing.T) {
	current, old := newHierarchy(t, "current"), newHierarchy(t, "old")
	chain := func(h hierarchy, sa string) [][]byte {
		ders, err := h.ca.Sign(newCSR(t), spiffe.ID{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: sa}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return ders
	}
	good, good2, stale := chain(current, "web"), chain(current, "db"), chain(old, "api")
	now := time.Now()
	for _, tt := range []struct {
		name   string
		chains [][][]byte
		now    time.Time
		want   VerifyReport
		errHas string
	}{
		{name: "none", want: VerifyReport{}},
		{name: "all current", chains: [][][]byte{good, good2}, now: now, want: VerifyReport{Certificates: 2}},
		{name: "one from the old anchor", chains: [][][]byte{good, stale, good2}, now: now,
			want: VerifyReport{Certificates: 3, Failed: 1}, errHas: "unknown authority"},
		{name: "missing intermediate", chains: [][][]byte{good[:1]}, now: now,
			want: VerifyReport{Certificates: 1, Failed: 1}, errHas: "unknown authority"},
		{name: "expired", chains: [][][]byte{good}, now: now.Add(25 * time.Hour),
			want: VerifyReport{Certificates: 1, Failed: 1}, errHas: "expired"},
		{name: "empty chain", chains: [][][]byte{nil}, now: now,
			want: VerifyReport{Certificates: 1, Failed: 1}, errHas: "empty certificate chain"},
		{name: "garbage", chains: [][][]byte{{[]byte("not DER")}}, now: now,
			want: VerifyReport{Certificates: 1, Failed: 1}, errHas: "parse certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := VerifyChains(current.anchors.Pool(), tt.chains, tt.now)
			if got.Certificates != tt.want.Certificates || got.Failed != tt.want.Failed {
				t.Fatalf("VerifyChains = %+v, want %d certificates, %d failed", got, tt.want.Certificates, tt.want.Failed)
			}
			if (tt.errHas == "") != (len(got.Errors) == 0) || !strings.Contains(strings.Join(got.Errors, "\n"), tt.errHas) {
				t.Fatalf("errors %q, want one containing %q", got.Errors, tt.errHas)
			}
		})
	}
}

// TestVerifyHandler: the admin endpoint answers over the manager's real
// certificates, names no identity, and refuses bad or oversized anchors.
func TestVerifyHandler(t *testing.T) {
	current, other := newHierarchy(t, "current"), newHierarchy(t, "other")
	m, err := NewManager(ManagerConfig{}, caCertifier{current.ca}, current.anchors.Pool(), prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	id := spiffe.ID{TrustDomain: "cluster.local", Namespace: "secret-team", ServiceAccount: "payroll"}
	m.Acquire(id)
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	if _, err := m.Certificate(cctx, id); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(m.VerifyHandler())
	t.Cleanup(srv.Close)
	post := func(body []byte) (int, string) {
		t.Helper()
		resp, err := http.Post(srv.URL, "application/x-pem-file", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	decode := func(s string) VerifyReport {
		t.Helper()
		var r VerifyReport
		if err := json.Unmarshal([]byte(s), &r); err != nil {
			t.Fatalf("decode %q: %v", s, err)
		}
		return r
	}

	code, body := post(current.anchorsPEM)
	if r := decode(body); code != http.StatusOK || r.Certificates != 1 || r.Failed != 0 {
		t.Errorf("current anchors: %d %s", code, body)
	}
	code, body = post(other.anchorsPEM)
	if r := decode(body); code != http.StatusOK || r.Certificates != 1 || r.Failed != 1 || len(r.Errors) != 1 {
		t.Errorf("other anchors: %d %s", code, body)
	}
	for _, secret := range []string{"secret-team", "payroll"} {
		if strings.Contains(body, secret) {
			t.Errorf("response names the identity (%q): %s", secret, body)
		}
	}
	if code, body := post([]byte("not PEM")); code != http.StatusBadRequest {
		t.Errorf("garbage anchors: %d %s", code, body)
	}
	if code, body := post(bytes.Repeat([]byte("A"), maxAnchorsBody+1)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized anchors: %d %s", code, body)
	}
}

func newCSR(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}
