// Package access guards the agent's observability API (capture, tap,
// edges): who is calling, and may they? Capturing a pod's traffic shows it
// in plaintext, so the agent asks the cluster, as the kubelet does for its
// own API: the caller is authenticated by a TLS client certificate signed
// by the cluster's client CA, or by a bearer token checked with a
// TokenReview; the call is then authorized with a SubjectAccessReview on
// a tunmesh resource of the pod's namespace:
//
//	verb get, group tap.tunmesh.io, resource pods, subresource capture|tap|edges,
//	namespace <pod's namespace>, name <pod> (empty for a whole namespace)
//
// so an admin grants capture of one namespace with a Role:
//
//	rules:
//	- apiGroups: [tap.tunmesh.io]
//	  resources: [pods/capture, pods/tap, pods/edges]
//	  verbs: [get]
//
// The reviews sit behind Reviewer (KubeReviewer calls the API) so that
// every decision is table-tested without a cluster.
package access

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/rbac"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

// Group is the API group of the tunmesh resources the reviews name.
const Group = "tap.tunmesh.io"

// Subresources of pods that the observability API serves.
const (
	Capture = "capture"
	Tap     = "tap"
	Edges   = "edges"
)

// Errors callers branch on (the HTTP layer maps them to 401 and 403).
var (
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrForbidden       = errors.New("forbidden")
)

// User is an authenticated caller.
type User struct {
	Name   string
	UID    string
	Groups []string
	Extra  map[string][]string
	// Method says how the caller proved it: "token" or "x509".
	Method string
}

// Attributes are what a call asks for: a subresource of pods in a
// namespace, for one pod (Name) or all of them (Name empty). Namespace
// empty means every namespace.
type Attributes struct {
	Subresource, Namespace, Name string
}

func (a Attributes) String() string {
	s := "get pods/" + a.Subresource + "." + Group
	if a.Name != "" {
		s += " " + a.Name
	}
	if a.Namespace != "" {
		return s + " in " + a.Namespace
	}
	return s + " cluster-wide"
}

// Reviewer asks the cluster: whose is this token, and may this user do that?
type Reviewer interface {
	// ReviewToken returns the token's user; ErrUnauthenticated when the
	// API says it is not valid.
	ReviewToken(ctx context.Context, token string) (User, error)
	// Allowed answers a SubjectAccessReview, with the authorizer's reason.
	Allowed(ctx context.Context, u User, a Attributes) (ok bool, reason string, err error)
}

// Audience is the audience a bearer token must be bound to for the agents
// to accept it (kubectl create token SA --audience tunmesh.io/observe).
// The API server's own tokens are refused, so a caller never hands an
// agent a credential that works against the API server, and a token an
// agent sees is useless anywhere else.
const Audience = observeapi.TokenAudience

// Gate authenticates and authorizes requests.
type Gate struct {
	Reviewer Reviewer
	// ClientCAs returns the CAs that verify client certificates now (nil
	// func or nil pool: certificates are not accepted, only tokens). The
	// TLS layer has verified the chain against the same pool; Gate only
	// reads the verified leaf.
	ClientCAs func() *x509.CertPool
}

func (g *Gate) certsAccepted() bool {
	return g.ClientCAs != nil && g.ClientCAs() != nil
}

// Authenticate returns the caller of r: the verified client certificate's
// subject (CN user, O groups), else the bearer token's user.
func (g *Gate) Authenticate(r *http.Request) (User, error) {
	if g.certsAccepted() && r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		leaf := r.TLS.VerifiedChains[0][0]
		if leaf.Subject.CommonName == "" {
			return User{}, fmt.Errorf("client certificate without a common name: %w", ErrUnauthenticated)
		}
		return User{Name: leaf.Subject.CommonName, Groups: append([]string{"system:authenticated"}, leaf.Subject.Organization...), Method: "x509"}, nil
	}
	h := r.Header.Get("Authorization")
	token, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || strings.TrimSpace(token) == "" {
		return User{}, fmt.Errorf("no client certificate and no bearer token: %w", ErrUnauthenticated)
	}
	u, err := g.Reviewer.ReviewToken(r.Context(), strings.TrimSpace(token))
	if err != nil {
		return User{}, err
	}
	u.Method = "token"
	return u, nil
}

// Authorize returns nil when u may do a, else an error wrapping
// ErrForbidden (or the review's failure: then nothing is allowed).
func (g *Gate) Authorize(ctx context.Context, u User, a Attributes) error {
	ok, reason, err := g.Reviewer.Allowed(ctx, u, a)
	if err != nil {
		return fmt.Errorf("subject access review: %w", err)
	}
	if !ok {
		msg := fmt.Sprintf("user %q may not %s", u.Name, a)
		if reason != "" {
			msg += ": " + reason
		}
		return fmt.Errorf("%s: %w", msg, ErrForbidden)
	}
	return nil
}

// Status maps an error of Authenticate or Authorize to an HTTP status.
func Status(err error) int {
	switch {
	case errors.Is(err, ErrUnauthenticated):
		return http.StatusUnauthorized
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	default:
		// The API could not answer: nothing is allowed meanwhile.
		return http.StatusServiceUnavailable
	}
}

// KubeReviewer runs the reviews against the API server.
type KubeReviewer struct {
	Client kubernetes.Interface
	// Audiences the token must be valid for (nil: the API server's; the
	// agent asks for Audience). The review's answer must name one of them.
	Audiences []string
}

// ReviewToken implements Reviewer with a TokenReview.
func (k KubeReviewer) ReviewToken(ctx context.Context, token string) (User, error) {
	tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: k.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return User{}, fmt.Errorf("token review: %w", err)
	}
	if !tr.Status.Authenticated {
		why := tr.Status.Error
		if why == "" {
			why = "token not authenticated"
		}
		return User{}, fmt.Errorf("%s: %w", why, ErrUnauthenticated)
	}
	if len(k.Audiences) > 0 && !slices.ContainsFunc(tr.Status.Audiences, func(a string) bool { return slices.Contains(k.Audiences, a) }) {
		return User{}, fmt.Errorf("token audiences %v include none of %v: %w", tr.Status.Audiences, k.Audiences, ErrUnauthenticated)
	}
	u := tr.Status.User
	extra := map[string][]string{}
	for k, v := range u.Extra {
		extra[k] = v
	}
	return User{Name: u.Username, UID: u.UID, Groups: u.Groups, Extra: extra}, nil
}

// Allowed implements Reviewer with a SubjectAccessReview.
func (k KubeReviewer) Allowed(ctx context.Context, u User, a Attributes) (bool, string, error) {
	extra := map[string]authorizationv1.ExtraValue{}
	for k, v := range u.Extra {
		extra[k] = v
	}
	sar, err := k.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
		Spec: authorizationv1.SubjectAccessReviewSpec{
			User: u.Name, UID: u.UID, Groups: u.Groups, Extra: extra,
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: "get", Group: Group, Resource: "pods", Subresource: a.Subresource,
				Namespace: a.Namespace, Name: a.Name,
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return false, "", err
	}
	return sar.Status.Allowed && !sar.Status.Denied, sar.Status.Reason, nil
}

// RequiredPermissions are the agent's API calls for the reviews.
func RequiredPermissions() []rbac.Permission {
	return append([]rbac.Permission{
		{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"},
		{Group: "authorization.k8s.io", Resource: "subjectaccessreviews", Verb: "create"},
	}, ClientCAPermissions()...)
}
