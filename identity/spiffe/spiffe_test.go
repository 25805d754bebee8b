package spiffe

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	tests := []struct {
		name    string
		in      string
		want    ID
		wantErr string // substring of the error; empty means success
	}{
		{name: "simple", in: "spiffe://cluster.local/ns/default/sa/web",
			want: ID{"cluster.local", "default", "web"}},
		{name: "subdomain sa", in: "spiffe://example.org/ns/kube-system/sa/a.b-c.d",
			want: ID{"example.org", "kube-system", "a.b-c.d"}},
		{name: "trust domain with underscore and dash", in: "spiffe://my_td-1/ns/a/sa/b",
			want: ID{"my_td-1", "a", "b"}},
		{name: "max namespace", in: "spiffe://td/ns/" + long(63) + "/sa/b",
			want: ID{"td", long(63), "b"}},
		{name: "max service account", in: "spiffe://td/ns/a/sa/" + long(253),
			want: ID{"td", "a", long(253)}},
		{name: "numeric labels", in: "spiffe://1/ns/0/sa/9", want: ID{"1", "0", "9"}},

		{name: "empty", in: "", wantErr: "scheme"},
		{name: "http scheme", in: "http://cluster.local/ns/a/sa/b", wantErr: "scheme"},
		{name: "upper case scheme", in: "SPIFFE://cluster.local/ns/a/sa/b", wantErr: "scheme"},
		{name: "no slashes", in: "spiffe:cluster.local/ns/a/sa/b", wantErr: "scheme"},
		{name: "port", in: "spiffe://cluster.local:8443/ns/a/sa/b", wantErr: "port not allowed"},
		{name: "userinfo", in: "spiffe://user@cluster.local/ns/a/sa/b", wantErr: "user info not allowed"},
		{name: "userinfo and port", in: "spiffe://u:p@cluster.local/ns/a/sa/b", wantErr: "user info not allowed"},
		{name: "query", in: "spiffe://cluster.local/ns/a/sa/b?x=1", wantErr: "query not allowed"},
		{name: "fragment", in: "spiffe://cluster.local/ns/a/sa/b#f", wantErr: "fragment not allowed"},
		{name: "empty trust domain", in: "spiffe:///ns/a/sa/b", wantErr: "empty trust domain"},
		{name: "upper case trust domain", in: "spiffe://Cluster.local/ns/a/sa/b", wantErr: "not in [a-z0-9._-]"},
		{name: "percent in trust domain", in: "spiffe://clus%74er/ns/a/sa/b", wantErr: "not in [a-z0-9._-]"},
		{name: "long trust domain", in: "spiffe://" + long(256) + "/ns/a/sa/b", wantErr: "trust domain longer"},
		{name: "no path", in: "spiffe://cluster.local", wantErr: "path must be"},
		{name: "root path", in: "spiffe://cluster.local/", wantErr: "path must be"},
		{name: "trailing slash", in: "spiffe://cluster.local/ns/a/sa/b/", wantErr: "path must be"},
		{name: "double slash", in: "spiffe://cluster.local//ns/a/sa/b", wantErr: "path must be"},
		{name: "extra segment", in: "spiffe://cluster.local/ns/a/sa/b/c", wantErr: "path must be"},
		{name: "wrong keywords", in: "spiffe://cluster.local/namespace/a/serviceaccount/b", wantErr: "path must be"},
		{name: "swapped keywords", in: "spiffe://cluster.local/sa/b/ns/a", wantErr: "path must be"},
		{name: "empty namespace", in: "spiffe://cluster.local/ns//sa/b", wantErr: "empty DNS-1123 label"},
		{name: "empty sa", in: "spiffe://cluster.local/ns/a/sa/", wantErr: "empty DNS-1123 subdomain"},
		{name: "dot namespace", in: "spiffe://cluster.local/ns/a.b/sa/b", wantErr: "namespace"},
		{name: "upper case namespace", in: "spiffe://cluster.local/ns/Default/sa/b", wantErr: "not in [a-z0-9-]"},
		{name: "namespace leading dash", in: "spiffe://cluster.local/ns/-a/sa/b", wantErr: "start and end"},
		{name: "namespace trailing dash", in: "spiffe://cluster.local/ns/a-/sa/b", wantErr: "start and end"},
		{name: "long namespace", in: "spiffe://td/ns/" + long(64) + "/sa/b", wantErr: "label longer than 63"},
		{name: "long sa", in: "spiffe://td/ns/a/sa/" + long(254), wantErr: "subdomain longer than 253"},
		{name: "sa empty label", in: "spiffe://td/ns/a/sa/a..b", wantErr: "empty label"},
		{name: "sa dot dot", in: "spiffe://td/ns/a/sa/..", wantErr: "empty label"},
		{name: "sa underscore", in: "spiffe://td/ns/a/sa/a_b", wantErr: "not in [a-z0-9-]"},
		{name: "percent-encoded sa", in: "spiffe://td/ns/a/sa/w%65b", wantErr: "not in [a-z0-9-]"},
		{name: "space", in: "spiffe://td/ns/a/sa/b c", wantErr: "not in [a-z0-9-]"},
		{name: "too long", in: "spiffe://" + long(2048), wantErr: "longer than 2048"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %+v, want error containing %q", tt.in, got, tt.wantErr)
				}
				if !errors.Is(err, ErrInvalidID) {
					t.Errorf("error %v does not wrap ErrInvalidID", err)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				if got != (ID{}) {
					t.Errorf("Parse returned %+v alongside an error", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("Parse(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if s := got.String(); s != tt.in {
				t.Errorf("String() = %q, want %q", s, tt.in)
			}
			if u := got.URL().String(); u != tt.in {
				t.Errorf("URL().String() = %q, want %q", u, tt.in)
			}
			if err := got.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		id ID
		ok bool
	}{
		{ID{"cluster.local", "default", "web"}, true},
		{ID{"", "default", "web"}, false},
		{ID{"cluster.local", "", "web"}, false},
		{ID{"cluster.local", "default", ""}, false},
		{ID{"cluster.local/ns/x", "default", "web"}, false},
		{ID{"cluster.local", "a/sa/b", "web"}, false},
		{ID{"cluster.local", "default", "web/x"}, false},
		{ID{"cluster.local", "default", "web?x"}, false},
	}
	for _, tt := range tests {
		err := tt.id.Validate()
		if (err == nil) != tt.ok {
			t.Errorf("%+v.Validate() = %v, want ok=%v", tt.id, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidID) {
			t.Errorf("%+v.Validate() = %v, does not wrap ErrInvalidID", tt.id, err)
		}
	}
}

func TestDNSName(t *testing.T) {
	id := ID{"cluster.local", "shop", "web"}
	if got, want := id.DNSName("tunmesh"), "web.shop.serviceaccount.identity.tunmesh.cluster.local"; got != want {
		t.Errorf("DNSName = %q, want %q", got, want)
	}
}

func TestFromCertificate(t *testing.T) {
	mustURL := func(s string) *url.URL {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	good := ID{"cluster.local", "shop", "web"}
	tests := []struct {
		name    string
		uris    []*url.URL
		want    ID
		wantErr string
	}{
		{name: "one URI", uris: []*url.URL{good.URL()}, want: good},
		{name: "none", wantErr: "found 0"},
		{name: "two", uris: []*url.URL{good.URL(), good.URL()}, wantErr: "found 2"},
		{name: "not spiffe", uris: []*url.URL{mustURL("https://example.com/ns/a/sa/b")}, wantErr: "scheme"},
		{name: "bad path", uris: []*url.URL{mustURL("spiffe://cluster.local/x")}, wantErr: "path must be"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert := selfSigned(t, tt.uris)
			got, err := FromCertificate(cert)
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, ErrInvalidID) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("FromCertificate = %+v, %v; want ErrInvalidID containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("FromCertificate = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
	if _, err := FromCertificate(nil); !errors.Is(err, ErrInvalidID) {
		t.Errorf("FromCertificate(nil) = %v, want ErrInvalidID", err)
	}
}

// selfSigned makes a real certificate so that FromCertificate sees URIs as
// crypto/x509 parses them, not as the test built them.
func selfSigned(t *testing.T, uris []*url.URL) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "test"},
		NotBefore:    time.Unix(0, 0),
		NotAfter:     time.Unix(0, 0).Add(time.Hour),
		URIs:         uris,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
