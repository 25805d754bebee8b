package authz

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/tunmesh/tunmesh/identity/spiffe"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func mustUnstructured(t testing.TB, s string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := json.Unmarshal([]byte(s), &u.Object); err != nil {
		t.Fatal(err)
	}
	return u
}

func TestCompileAuthorization(t *testing.T) {
	const head = `{"apiVersion":"policy.tunmesh.io/v1alpha1","kind":"Authorization","metadata":{"namespace":"prod","name":"a"},"spec":`
	for _, tc := range []struct {
		name, spec string
		convErr    bool // FromUnstructured refuses
		invalid    bool // Compile reports it
	}{
		{name: "service account, default namespace", spec: `{"podSelector":{},"from":[{"serviceAccount":{"name":"web"}}]}`},
		{name: "all forms", spec: `{"podSelector":{"matchLabels":{"app":"api"}},"ports":[{"port":8080},{"port":"http"},{"port":9000,"endPort":9100}],
			"from":[{"serviceAccount":{"name":"web","namespace":"front"}},{"namespace":"monitoring"},{"spiffeID":"spiffe://cluster.local/ns/x/sa/y"}]}`},
		{name: "no from", spec: `{"podSelector":{}}`, invalid: true},
		{name: "two kinds in one entry", spec: `{"podSelector":{},"from":[{"namespace":"a","spiffeID":"spiffe://cluster.local/ns/x/sa/y"}]}`, invalid: true},
		{name: "empty entry", spec: `{"podSelector":{},"from":[{}]}`, invalid: true},
		{name: "bad spiffe id", spec: `{"podSelector":{},"from":[{"spiffeID":"http://x/ns/a/sa/b"}]}`, invalid: true},
		{name: "bad namespace", spec: `{"podSelector":{},"from":[{"namespace":"Not_A_Label"}]}`, invalid: true},
		{name: "bad port range", spec: `{"podSelector":{},"ports":[{"port":9000,"endPort":80}],"from":[{"namespace":"a"}]}`, invalid: true},
		{name: "endPort with a name", spec: `{"podSelector":{},"ports":[{"port":"http","endPort":80}],"from":[{"namespace":"a"}]}`, invalid: true},
		{name: "bad selector", spec: `{"podSelector":{"matchExpressions":[{"key":"a","operator":"Bogus"}]},"from":[{"namespace":"a"}]}`, invalid: true},
		{name: "unknown field (newer CRD)", spec: `{"podSelector":{},"from":[{"namespace":"a"}],"action":"DENY"}`, convErr: true},
		{name: "wrong type", spec: `{"podSelector":{},"from":"everyone"}`, convErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := FromUnstructured(mustUnstructured(t, head+tc.spec+"}"))
			if tc.convErr {
				if err == nil || !errors.Is(err, ErrInvalidAuthorization) {
					t.Fatalf("FromUnstructured = %v, want ErrInvalidAuthorization", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			a, err := Compile(o)
			if (err != nil) != tc.invalid || a.Invalid() != tc.invalid {
				t.Fatalf("Compile err=%v invalid=%v, want invalid %v", err, a.Invalid(), tc.invalid)
			}
			if err != nil && !errors.Is(err, ErrInvalidAuthorization) {
				t.Fatalf("error %v does not wrap ErrInvalidAuthorization", err)
			}
			if tc.invalid {
				if a.admitsPort(8080, nil) || a.admitsIdentity(*id("a", "b"), "cluster.local") {
					t.Fatal("an invalid authorization admits something")
				}
				if tc.name == "bad selector" && !a.Selects(map[string]string{"any": "pod"}) {
					t.Fatal("an authorization with a bad selector must restrict every pod of its namespace")
				}
			}
		})
	}
}

func TestAuthorizationMatches(t *testing.T) {
	o, err := FromUnstructured(mustUnstructured(t, `{"metadata":{"namespace":"prod","name":"a"},"spec":{"podSelector":{},
		"ports":[{"port":"http"},{"port":9000,"endPort":9100}],
		"from":[{"serviceAccount":{"name":"web"}},{"namespace":"monitoring"},{"spiffeID":"spiffe://other.org/ns/x/sa/y"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	a, err := Compile(o)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id   string
		want bool
	}{
		{"spiffe://cluster.local/ns/prod/sa/web", true},
		{"spiffe://cluster.local/ns/front/sa/web", false}, // namespace defaults to the Authorization's
		{"spiffe://cluster.local/ns/monitoring/sa/prom", true},
		{"spiffe://other.org/ns/monitoring/sa/prom", false}, // namespace entries are of the local trust domain
		{"spiffe://other.org/ns/x/sa/y", true},
	} {
		got, err := spiffe.Parse(tc.id)
		if err != nil {
			t.Fatal(err)
		}
		if a.admitsIdentity(got, "cluster.local") != tc.want {
			t.Errorf("admitsIdentity(%s) = %v", tc.id, !tc.want)
		}
	}
	ports := []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}
	for port, want := range map[int32]bool{8080: true, 8081: false, 9000: true, 9100: true, 9101: false} {
		if a.admitsPort(port, ports) != want {
			t.Errorf("admitsPort(%d) = %v", port, !want)
		}
	}
}

func TestReporterOncePerConnection(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := NewReporter(reg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	d := Decision{Direction: "ingress", Kind: KindNetworkPolicy, Policy: "prod/deny-all", Reason: ReasonNetpolDefaultDeny}
	src, dst := netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.0.0.2:80")
	if !r.Denied(AtSource, src, dst, d) || r.Denied(AtSource, src, dst, d) {
		t.Fatal("a retransmitted SYN was reported twice (or the first not at all)")
	}
	if !r.Denied(AtDestination, src, dst, d) {
		t.Fatal("another enforcement point is another report")
	}
	now = now.Add(seenTTL)
	if !r.Denied(AtSource, src, dst, d) {
		t.Fatal("a tuple reused after seenTTL is a new connection")
	}
	c := r.denials.WithLabelValues(AtSource, "ingress", KindNetworkPolicy, "prod", "deny-all", ReasonNetpolDefaultDeny)
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got != 2 {
		t.Fatalf("counter = %v, want 2", got)
	}
}

// FuzzAuthorization: any JSON object converts or is refused with
// ErrInvalidAuthorization, compiles without panicking, and an invalid one
// admits nothing.
func FuzzAuthorization(f *testing.F) {
	f.Add(`{"metadata":{"namespace":"p","name":"a"},"spec":{"podSelector":{},"from":[{"namespace":"a"}]}}`)
	f.Add(`{"spec":{"podSelector":{"matchExpressions":[{"key":"a","operator":"In","values":["x"]}]},"ports":[{"port":"http"},{"port":1,"endPort":2}],"from":[{"serviceAccount":{"name":"x"}},{"spiffeID":"spiffe://td/ns/a/sa/b"}]}}`)
	f.Fuzz(func(t *testing.T, s string) {
		u := &unstructured.Unstructured{}
		if json.Unmarshal([]byte(s), &u.Object) != nil || u.Object == nil {
			return
		}
		o, err := FromUnstructured(u)
		if err != nil {
			if !errors.Is(err, ErrInvalidAuthorization) {
				t.Fatalf("error %v does not wrap ErrInvalidAuthorization", err)
			}
			return
		}
		a, err := Compile(o)
		if err != nil && (!a.Invalid() || a.admitsPort(80, nil) || a.admitsIdentity(*id("a", "b"), "cluster.local")) {
			t.Fatalf("invalid authorization %s admits something", s)
		}
	})
}
