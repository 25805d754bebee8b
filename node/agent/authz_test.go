package agent

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/node/authz"
	"github.com/tunmesh/tunmesh/node/netpol"
	"github.com/tunmesh/tunmesh/node/policy"
)

// prodOnly is a cluster with one namespace, prod, and no pods.
type prodOnly struct{}

func (prodOnly) PodByAddr(netip.Addr) (*corev1.Pod, error) { return nil, nil }
func (prodOnly) Namespace(name string) (*corev1.Namespace, error) {
	if name == "prod" {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "namespaces"}, name)
}

// TestWarnInvalidDefaultInbound: a default inbound policy value the agent
// cannot use is reported on the pod once per value, not per connection.
func TestWarnInvalidDefaultInbound(t *testing.T) {
	snap, _ := netpol.NewSnapshot(nil, nil)
	eng, err := authz.New(prodOnly{}, snap, authz.Index{}, policy.Config{}, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	rec := record.NewFakeRecorder(10)
	e := &enforcer{engine: eng, recorder: rec, log: slog.New(slog.DiscardHandler), warned: map[string]string{}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "api", UID: "u1",
		Annotations: map[string]string{policy.AnnotationDefaultInboundPolicy: "allow-all"}}}
	d := eng.Inbound(authz.Client{IP: netip.MustParseAddr("10.0.0.1")}, pod, 80)
	if d.Allowed || d.Kind != authz.KindDefaultInbound {
		t.Fatalf("bad value: %+v, want a default inbound denial", d)
	}
	e.warnInvalid(pod, d)
	e.warnInvalid(pod, d)
	pod.Annotations[policy.AnnotationDefaultInboundPolicy] = "Deny"
	e.warnInvalid(pod, d)
	// A valid deny is not a warning.
	pod.Annotations[policy.AnnotationDefaultInboundPolicy] = "deny"
	e.warnInvalid(pod, eng.Inbound(authz.Client{IP: netip.MustParseAddr("10.0.0.1")}, pod, 80))
	close(rec.Events)
	var events []string
	for ev := range rec.Events {
		events = append(events, ev)
	}
	if len(events) != 2 || !strings.Contains(events[0], "Warning InvalidMeshAnnotation") {
		t.Fatalf("events %q, want two warnings (one per bad value)", events)
	}
}
