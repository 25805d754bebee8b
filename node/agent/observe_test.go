package agent

import (
	"context"
	"log/slog"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tunmesh/tunmesh/node/observeapi"
)

// TestPublishFingerprint: the serving certificate's fingerprint lands on
// the agent's Node, other annotations untouched; without the Node the
// agent retries until stopped.
func TestPublishFingerprint(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: map[string]string{"other": "kept"}}})
	a := &Agent{client: client, cfg: Config{NodeName: "n1"}, log: slog.New(slog.DiscardHandler)}
	a.publishFingerprint(context.Background(), "abc123")
	n, err := client.CoreV1().Nodes().Get(context.Background(), "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Annotations[observeapi.FingerprintAnnotation] != "abc123" || n.Annotations["other"] != "kept" {
		t.Fatalf("annotations %v", n.Annotations)
	}
	a.cfg.NodeName = "missing"
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	a.publishFingerprint(ctx, "abc123")
	if time.Since(start) < 600*time.Millisecond {
		t.Fatal("gave up before its context ended")
	}
}
