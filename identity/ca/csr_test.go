package ca

import (
	"crypto/x509"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

func TestCheckCSR(t *testing.T) {
	key := p256Key(t)
	dnsName := testID.DNSName("tunmesh")
	good := func(o csrOpts) *x509.CertificateRequest { return parseCSR(t, makeCSR(t, key, o)) }

	badSig := good(csrOpts{})
	badSig.Signature = append([]byte(nil), badSig.Signature...)
	badSig.Signature[len(badSig.Signature)-1] ^= 0xff

	otherID := spiffe.ID{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "db"}
	type tc struct {
		name    string
		csr     *x509.CertificateRequest
		id      spiffe.ID
		ctrlNS  string
		wantErr error
		wantMsg string
	}
	tests := []tc{
		{name: "no SANs", csr: good(csrOpts{})},
		{name: "subject ignored", csr: good(csrOpts{cn: "admin"})},
		{name: "exact URI", csr: good(csrOpts{uris: []*url.URL{testID.URL()}})},
		{name: "exact DNS", csr: good(csrOpts{dns: []string{dnsName}})},
		{name: "exact URI and DNS", csr: good(csrOpts{uris: []*url.URL{testID.URL()}, dns: []string{dnsName}})},
		{name: "other control namespace", csr: good(csrOpts{dns: []string{testID.DNSName("mesh")}}), ctrlNS: "mesh"},

		{name: "nil CSR", csr: nil, wantErr: ErrBadCSR},
		{name: "bad signature", csr: badSig, wantErr: ErrBadCSR},
		{name: "invalid id", csr: good(csrOpts{}), id: spiffe.ID{TrustDomain: "cluster.local", Namespace: "Shop", ServiceAccount: "web"}, wantErr: spiffe.ErrInvalidID},
		{name: "empty id", csr: good(csrOpts{}), id: spiffe.ID{}, wantErr: spiffe.ErrInvalidID},
		{name: "other identity URI", csr: good(csrOpts{uris: []*url.URL{otherID.URL()}}),
			wantErr: ErrSANMismatch, wantMsg: `URI SAN "spiffe://cluster.local/ns/shop/sa/db"`},
		{name: "two URIs", csr: good(csrOpts{uris: []*url.URL{testID.URL(), otherID.URL()}}), wantErr: ErrSANMismatch, wantMsg: "2 URI SANs"},
		{name: "URI of other trust domain", csr: good(csrOpts{uris: []*url.URL{mustURL(t, "spiffe://evil.org/ns/shop/sa/web")}}), wantErr: ErrSANMismatch, wantMsg: "evil.org"},
		{name: "https URI", csr: good(csrOpts{uris: []*url.URL{mustURL(t, "https://web.shop")}}), wantErr: ErrSANMismatch},
		{name: "other DNS", csr: good(csrOpts{dns: []string{"kubernetes.default.svc"}}), wantErr: ErrSANMismatch, wantMsg: `DNS SAN "kubernetes.default.svc"`},
		{name: "DNS for other control namespace", csr: good(csrOpts{dns: []string{testID.DNSName("mesh")}}), wantErr: ErrSANMismatch},
		{name: "extra DNS", csr: good(csrOpts{dns: []string{dnsName, "x.example"}}), wantErr: ErrSANMismatch, wantMsg: "2 DNS SANs"},
		{name: "IP", csr: good(csrOpts{ips: []net.IP{net.ParseIP("10.0.0.1")}}), wantErr: ErrSANMismatch, wantMsg: "IP SAN 10.0.0.1"},
		{name: "email", csr: good(csrOpts{emails: []string{"root@example.com"}}), wantErr: ErrSANMismatch, wantMsg: `email SAN "root@example.com"`},
	}
	for _, fk := range foreignKeys() {
		tests = append(tests, tc{name: fk.name + " key", csr: parseCSR(t, makeCSR(t, fk.key, csrOpts{})),
			wantErr: ErrUnsupportedAlgorithm, wantMsg: fk.name})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := testID
			if tt.id != testID && (tt.id != spiffe.ID{} || tt.name == "empty id") {
				id = tt.id
			}
			ctrlNS := "tunmesh"
			if tt.ctrlNS != "" {
				ctrlNS = tt.ctrlNS
			}
			err := CheckCSR(tt.csr, id, ctrlNS)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("CheckCSR: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("CheckCSR = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantMsg)
			}
		})
	}
}
