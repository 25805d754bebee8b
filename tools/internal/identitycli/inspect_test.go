package identitycli

import (
	"bytes"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/identity/ca"
)

func TestInspect(t *testing.T) {
	h := newHierarchy(t, 365*day, 180*day)
	signed := t0.Add(time.Hour)
	chain := h.leaf(t, "shop", "web", signed)
	leaf, issuer := chain[0], chain[1]
	full := ca.EncodeCertPEM(leaf, issuer, h.root)

	stranger := newHierarchy(t, 365*day, 180*day)
	keyPEM, err := ca.EncodeKeyPEM(h.issuer.Key)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		in      []byte
		now     time.Time
		want    []string
		notWant []string
	}{
		{
			name: "leaf, issuer, root",
			in:   full,
			now:  signed.Add(time.Minute),
			want: []string{
				"Certificate 0\n",
				"  Subject:    CN=web.shop.serviceaccount.identity.tunmesh.cluster.local\n",
				"  Issuer:     CN=identity.tunmesh.cluster.local\n",
				"  Serial:     " + serialHex(leaf) + "\n",
				"  Key:        ECDSA P-256\n",
				"  CA:         no\n",
				"  URI SANs:   spiffe://cluster.local/ns/shop/sa/web\n",
				"  DNS SANs:   web.shop.serviceaccount.identity.tunmesh.cluster.local\n",
				"  Not before: 2026-03-01T12:59:40Z\n",
				"  Not after:  2026-03-02T13:00:00Z (expires in 23h59m)\n",
				"\nCertificate 1\n",
				"  CA:         yes, max path length 0\n",
				"  Not after:  2026-08-28T12:00:00Z (expires in 179d22h)\n",
				"\nCertificate 2\n",
				"  Subject:    CN=root.tunmesh.cluster.local\n",
				"  CA:         yes, path length unconstrained\n",
				"\nChain: OK: CN=web.shop.serviceaccount.identity.tunmesh.cluster.local -> CN=identity.tunmesh.cluster.local -> CN=root.tunmesh.cluster.local\n",
			},
		},
		{
			name: "leaf and issuer only",
			in:   ca.EncodeCertPEM(leaf, issuer),
			now:  signed,
			want: []string{"Certificate 1\n", "Chain: OK: CN=web.shop.serviceaccount.identity.tunmesh.cluster.local -> CN=identity.tunmesh.cluster.local\n"},
		},
		{
			name:    "expired leaf",
			in:      full,
			now:     signed.Add(26 * time.Hour),
			want:    []string{"(EXPIRED 2h0m ago)", "Chain: FAILED: certificate 0 does not verify against the other 2: x509: certificate has expired"},
			notWant: []string{"Chain: OK"},
		},
		{
			name: "not yet valid",
			in:   ca.EncodeCertPEM(leaf),
			now:  signed.Add(-time.Hour),
			want: []string{"(NOT YET VALID, starts in 59m40s)", "Chain: single certificate, nothing to verify it against\n"},
		},
		{
			name: "wrong root",
			in:   ca.EncodeCertPEM(leaf, stranger.root),
			now:  signed,
			want: []string{"Chain: FAILED: certificate 0 does not verify against the other 1: x509: certificate signed by unknown authority"},
		},
		{
			name:    "issuer present, wrong root",
			in:      ca.EncodeCertPEM(leaf, issuer, stranger.root),
			now:     signed,
			want:    []string{"Chain: FAILED: certificate 0 does not verify against the other 2"},
			notWant: []string{"Chain: OK"},
		},
		{
			name: "self-signed root alone",
			in:   ca.EncodeCertPEM(h.root),
			now:  signed,
			want: []string{"Chain: single self-signed certificate, signature OK\n", "Issuer:     CN=root.tunmesh.cluster.local\n"},
		},
		{
			name:    "key blocks skipped",
			in:      append(append([]byte{}, keyPEM...), ca.EncodeCertPEM(issuer, h.root)...),
			now:     signed,
			want:    []string{"Certificate 0\n  Subject:    CN=identity.tunmesh.cluster.local\n", "Chain: OK"},
			notWant: []string{"Certificate 2"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := Inspect(&out, tt.in, tt.now); err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(out.String(), w) {
					t.Errorf("output has %q:\n%s", w, out.String())
				}
			}
		})
	}

	for name, in := range map[string][]byte{
		"empty":    nil,
		"garbage":  []byte("hello"),
		"key only": keyPEM,
	} {
		if err := Inspect(&bytes.Buffer{}, in, t0); !errors.Is(err, ErrNoCertificates) {
			t.Errorf("%s: Inspect = %v, want ErrNoCertificates", name, err)
		}
	}
	bad := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")})
	if err := Inspect(&bytes.Buffer{}, bad, t0); err == nil || !strings.Contains(err.Error(), "certificate 0") {
		t.Errorf("Inspect of a broken certificate = %v", err)
	}
}

func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                 "0s",
		59*time.Second + time.Millisecond: "59s",
		4*time.Minute + 10*time.Second:    "4m10s",
		time.Hour:                         "1h0m",
		23*time.Hour + 59*time.Minute + 59*time.Second: "23h59m",
		day:                                     "1d0h",
		179*day + 23*time.Hour + 59*time.Minute: "179d23h",
		-2 * time.Hour:                          "2h0m",
	} {
		if got := humanDuration(d); got != want {
			t.Errorf("humanDuration(%s) = %q, want %q", d, got, want)
		}
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestInspectWriteError(t *testing.T) {
	h := newHierarchy(t, 365*day, 180*day)
	if err := Inspect(failingWriter{}, ca.EncodeCertPEM(h.root), t0); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("Inspect = %v, want the write error", err)
	}
}
