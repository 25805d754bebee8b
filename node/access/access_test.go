package access

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// fakeReviewer knows tokens and grants.
type fakeReviewer struct {
	tokens map[string]User
	grants map[string][]Attributes // user -> allowed
	err    error                   // the API is down
	asked  []Attributes
}

func (f *fakeReviewer) ReviewToken(_ context.Context, token string) (User, error) {
	if f.err != nil {
		return User{}, f.err
	}
	u, ok := f.tokens[token]
	if !ok {
		return User{}, ErrUnauthenticated
	}
	return u, nil
}

func (f *fakeReviewer) Allowed(_ context.Context, u User, a Attributes) (bool, string, error) {
	f.asked = append(f.asked, a)
	if f.err != nil {
		return false, "", f.err
	}
	for _, g := range f.grants[u.Name] {
		if g.Subresource == a.Subresource && (g.Namespace == "" || g.Namespace == a.Namespace) && (g.Name == "" || g.Name == a.Name) {
			return true, "", nil
		}
	}
	return false, "no RBAC policy matched", nil
}

func TestGate(t *testing.T) {
	alice := User{Name: "alice", Groups: []string{"devs"}}
	rev := func() *fakeReviewer {
		return &fakeReviewer{
			tokens: map[string]User{"tok-alice": alice, "tok-bob": {Name: "bob"}},
			grants: map[string][]Attributes{
				"alice": {{Subresource: Capture, Namespace: "shop"}},
				"admin": {{Subresource: Capture}, {Subresource: Tap}, {Subresource: Edges}},
			},
		}
	}
	certReq := func(cn string, orgs ...string) *http.Request {
		r := httptest.NewRequest("GET", "/capture", nil)
		r.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{Subject: pkix.Name{CommonName: cn, Organization: orgs}}}}}
		return r
	}
	tokenReq := func(h string) *http.Request {
		r := httptest.NewRequest("GET", "/capture", nil)
		if h != "" {
			r.Header.Set("Authorization", h)
		}
		return r
	}
	cases := []struct {
		name       string
		req        *http.Request
		certs      bool
		apiDown    bool
		attrs      Attributes
		wantUser   string
		wantStatus int // 0: allowed
	}{
		{"token allowed in its namespace", tokenReq("Bearer tok-alice"), false, false, Attributes{Capture, "shop", "web-1"}, "alice", 0},
		{"token forbidden elsewhere", tokenReq("Bearer tok-alice"), false, false, Attributes{Capture, "bank", "web-1"}, "alice", 403},
		{"token forbidden for another subresource", tokenReq("Bearer tok-alice"), false, false, Attributes{Tap, "shop", "web-1"}, "alice", 403},
		{"token without any grant", tokenReq("Bearer tok-bob"), false, false, Attributes{Capture, "shop", "x"}, "bob", 403},
		{"unknown token", tokenReq("Bearer nope"), false, false, Attributes{Capture, "shop", "x"}, "", 401},
		{"no credentials", tokenReq(""), false, false, Attributes{Capture, "shop", "x"}, "", 401},
		{"basic auth is not a token", tokenReq("Basic YWxpY2U6eA=="), false, false, Attributes{Capture, "shop", "x"}, "", 401},
		{"empty bearer", tokenReq("Bearer  "), false, false, Attributes{Capture, "shop", "x"}, "", 401},
		{"client cert allowed", certReq("admin", "system:masters"), true, false, Attributes{Edges, "", ""}, "admin", 0},
		{"client cert ignored without client CAs", certReq("admin"), false, false, Attributes{Edges, "", ""}, "", 401},
		{"client cert without CN", certReq(""), true, false, Attributes{Edges, "", ""}, "", 401},
		{"API down: nothing allowed", tokenReq("Bearer tok-alice"), false, true, Attributes{Capture, "shop", "web-1"}, "", 503},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := rev()
			if c.apiDown {
				r.err = errors.New("connection refused")
			}
			g := &Gate{Reviewer: r}
			if c.certs {
				g.ClientCAs = func() *x509.CertPool { return x509.NewCertPool() }
			}
			u, err := g.Authenticate(c.req)
			if err == nil {
				err = g.Authorize(context.Background(), u, c.attrs)
			}
			got := 0
			if err != nil {
				got = Status(err)
			}
			if got != c.wantStatus {
				t.Fatalf("status %d (err %v), want %d", got, err, c.wantStatus)
			}
			if c.wantUser != "" && u.Name != c.wantUser {
				t.Fatalf("user %q, want %q", u.Name, c.wantUser)
			}
			if c.wantStatus == 403 && len(r.asked) != 1 {
				t.Fatalf("asked %d reviews, want 1", len(r.asked))
			}
		})
	}
}

// TestKubeReviewer: the reviews sent to the API carry the token, the
// user, and the tunmesh resource; the answers are read as they should be.
func TestKubeReviewer(t *testing.T) {
	client := fake.NewClientset()
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
		if tr.Spec.Token == "good" {
			tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{
				Username: "system:serviceaccount:shop:ci", UID: "u1", Groups: []string{"system:serviceaccounts"},
				Extra: map[string]authenticationv1.ExtraValue{"authentication.kubernetes.io/pod-name": {"p"}}}}
		} else {
			tr.Status = authenticationv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	var got *authorizationv1.SubjectAccessReview
	client.PrependReactor("create", "subjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		got = a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SubjectAccessReview)
		got.Status.Allowed = got.Spec.ResourceAttributes.Namespace == "shop"
		got.Status.Reason = "test"
		return true, got, nil
	})
	k := KubeReviewer{Client: client}
	ctx := context.Background()
	if _, err := k.ReviewToken(ctx, "bad"); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("bad token: %v", err)
	}
	u, err := k.ReviewToken(ctx, "good")
	if err != nil || u.Name != "system:serviceaccount:shop:ci" || u.UID != "u1" || len(u.Extra) != 1 {
		t.Fatalf("good token: %+v, %v", u, err)
	}
	ok, _, err := k.Allowed(ctx, u, Attributes{Capture, "shop", "web"})
	if err != nil || !ok {
		t.Fatalf("allowed = %v, %v", ok, err)
	}
	ra := got.Spec.ResourceAttributes
	if got.Spec.User != u.Name || got.Spec.UID != "u1" || ra.Group != Group || ra.Resource != "pods" || ra.Subresource != Capture || ra.Verb != "get" || ra.Name != "web" {
		t.Fatalf("review sent: %+v %+v", got.Spec, ra)
	}
	if len(got.Spec.Extra["authentication.kubernetes.io/pod-name"]) != 1 {
		t.Fatalf("extra not passed: %+v", got.Spec.Extra)
	}
	if ok, _, _ := k.Allowed(ctx, u, Attributes{Capture, "bank", "web"}); ok {
		t.Fatal("allowed in bank")
	}
}

// TestKubeReviewerAudience: the agent's TokenReview asks for
// tunmesh.io/observe, and a token the API server says is valid for other
// audiences only (its own) is refused.
func TestKubeReviewerAudience(t *testing.T) {
	client := fake.NewClientset()
	var asked []string
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
		asked = tr.Spec.Audiences
		aud := []string{"https://kubernetes.default.svc"}
		if tr.Spec.Token == "observe" {
			aud = []string{Audience}
		}
		tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: aud, User: authenticationv1.UserInfo{Username: "system:serviceaccount:shop:ci"}}
		return true, tr, nil
	})
	k := KubeReviewer{Client: client, Audiences: []string{Audience}}
	ctx := context.Background()
	if u, err := k.ReviewToken(ctx, "observe"); err != nil || u.Name != "system:serviceaccount:shop:ci" {
		t.Fatalf("audience-bound token: %+v, %v", u, err)
	}
	if len(asked) != 1 || asked[0] != Audience {
		t.Fatalf("review asked for audiences %v, want [%s]", asked, Audience)
	}
	if _, err := k.ReviewToken(ctx, "apiserver"); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("API-server token: err %v, want ErrUnauthenticated", err)
	}
}
