package service

import (
	"context"
	"fmt"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// Keys the API server puts into a bound token's TokenReview user.extra.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// refusal is a request check that failed; code goes to the client.
type refusal struct {
	code api.Code
	msg  string
}

func (r *refusal) Error() string { return string(r.code) + ": " + r.msg }

func refuse(code api.Code, format string, args ...any) error {
	return &refusal{code: code, msg: fmt.Sprintf(format, args...)}
}

// agentNode authenticates the bearer token with a TokenReview for our
// audience and returns the node of the agent pod the token is bound to.
func (s *Service) agentNode(ctx context.Context, token string) (string, error) {
	if token == "" {
		return "", refuse(api.CodeUnauthenticated, "no bearer token")
	}
	if node, ok := s.tokens.get(token, s.now()); ok {
		return node, nil
	}
	review := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{
		Token:     token,
		Audiences: []string{api.Audience},
	}}
	res, err := s.client.AuthenticationV1().TokenReviews().Create(ctx, review, metav1.CreateOptions{})
	if err != nil {
		return "", refuse(api.CodeUnavailable, "token review: %v", err)
	}
	st := res.Status
	if !st.Authenticated {
		msg := st.Error
		if msg == "" {
			msg = "token not authenticated"
		}
		return "", refuse(api.CodeUnauthenticated, "%s", msg)
	}
	if !audienceOK(st.Audiences) {
		return "", refuse(api.CodeUnauthenticated, "token audiences %v do not include %q", st.Audiences, api.Audience)
	}
	want := "system:serviceaccount:" + s.cfg.AgentNamespace + ":" + s.cfg.AgentServiceAccount
	if st.User.Username != want {
		return "", refuse(api.CodeNotAgent, "caller %q is not the node agent (%s)", st.User.Username, want)
	}
	podName, podUID := first(st.User.Extra[extraPodName]), first(st.User.Extra[extraPodUID])
	if podName == "" || podUID == "" {
		return "", refuse(api.CodeAgentPodUnknown, "token is not bound to a pod")
	}
	pod, err := s.getPod(ctx, s.cfg.AgentNamespace, podName)
	if err != nil {
		return "", err
	}
	if string(pod.UID) != podUID {
		return "", refuse(api.CodeAgentPodUnknown, "agent pod %s/%s was replaced (uid %s, token bound to %s)", pod.Namespace, pod.Name, pod.UID, podUID)
	}
	node := pod.Spec.NodeName
	if node == "" {
		return "", refuse(api.CodeAgentPodUnknown, "agent pod %s/%s is not scheduled", pod.Namespace, pod.Name)
	}
	if n := first(st.User.Extra[extraNodeName]); n != "" && n != node {
		return "", refuse(api.CodeAgentPodUnknown, "token names node %q but agent pod runs on %q", n, node)
	}
	s.tokens.put(token, node, s.now())
	return node, nil
}

func audienceOK(auds []string) bool {
	for _, a := range auds {
		if a == api.Audience {
			return true
		}
	}
	return false
}

func first(v authenticationv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// getPod reads a pod from the informer, falling back to the API server so
// that a pod created a moment ago is not refused.
func (s *Service) getPod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	if obj, ok, err := s.pods.GetByKey(ns + "/" + name); err == nil && ok {
		return obj.(*corev1.Pod), nil
	}
	pod, err := s.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, refuse(api.CodeAgentPodUnknown, "agent pod %s/%s does not exist", ns, name)
	}
	if err != nil {
		return nil, refuse(api.CodeUnavailable, "get agent pod %s/%s: %v", ns, name, err)
	}
	return pod, nil
}

const byNodeIdentity = "nodeIdentity"

func nodeIdentityKey(node, ns, sa string) string { return node + "/" + ns + "/" + sa }

// indexByNodeIdentity indexes pods that hold (or will hold) a node's
// resources: bound to a node and not finished.
func indexByNodeIdentity(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || !podHoldsIdentity(pod) {
		return nil, nil
	}
	return []string{nodeIdentityKey(pod.Spec.NodeName, pod.Namespace, serviceAccountOf(pod))}, nil
}

func podHoldsIdentity(pod *corev1.Pod) bool {
	return pod.Spec.NodeName != "" && pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
}

func serviceAccountOf(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}

// authorizeNode checks that a pod with identity id is scheduled on node.
// A negative answer from the informer is confirmed with a live list so a
// just-scheduled pod is not refused.
func (s *Service) authorizeNode(ctx context.Context, node string, id spiffe.ID) error {
	objs, err := s.pods.ByIndex(byNodeIdentity, nodeIdentityKey(node, id.Namespace, id.ServiceAccount))
	if err == nil && len(objs) > 0 {
		return nil
	}
	list, err := s.client.CoreV1().Pods(id.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return refuse(api.CodeUnavailable, "list pods of %s on %s: %v", id.Namespace, node, err)
	}
	for i := range list.Items {
		if p := &list.Items[i]; podHoldsIdentity(p) && serviceAccountOf(p) == id.ServiceAccount {
			return nil
		}
	}
	return refuse(api.CodeIdentityNotOnNode, "no pod with service account %s/%s is scheduled on node %s", id.Namespace, id.ServiceAccount, node)
}

// bearer extracts the token of an "Authorization: Bearer x" header.
func bearer(h string) string {
	const p = "Bearer "
	if len(h) > len(p) && strings.EqualFold(h[:len(p)], p) {
		return strings.TrimSpace(h[len(p):])
	}
	return ""
}
