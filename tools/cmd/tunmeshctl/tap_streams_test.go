package main

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/node/flowlog"
)

// TestTapStreams: a workload is tapped one pod= request per pod on its
// node (nothing namespace-wide), a namespace one request per node; each
// pod's stream keeps only its own pod's events, so a connection between
// two tapped pods of one node prints once.
func TestTapStreams(t *testing.T) {
	pod := func(name, node string) corev1.Pod {
		return corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"}, Spec: corev1.PodSpec{NodeName: node}}
	}
	got := tapStreams("shop", []corev1.Pod{pod("web-2", "n2"), pod("web-1", "n1"), pod("web-3", "n1"), pod("web-4", "")}, nil)
	want := []string{"n1 namespace=shop&pod=web-1", "n1 namespace=shop&pod=web-3", "n2 namespace=shop&pod=web-2"}
	if len(got) != len(want) {
		t.Fatalf("streams %+v, want %v", got, want)
	}
	for i, s := range got {
		if s.node+" "+s.query.Encode() != want[i] || s.pod == "" {
			t.Fatalf("stream %d: %s %s (pod %q), want %s", i, s.node, s.query.Encode(), s.pod, want[i])
		}
	}
	ns := tapStreams("shop", nil, []string{"n1", "n2"})
	if len(ns) != 2 || ns[0].query.Encode() != "namespace=shop" || ns[0].query.Has("pod") {
		t.Fatalf("namespace streams %+v", ns)
	}

	f := tapFilter{ns: "shop", names: map[string]bool{"web-1": true, "web-3": true}, reqs: map[string]flowlog.Event{}}
	c := flowlog.Conn{Proxy: flowlog.Out, Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.3:80"),
		SrcPod: flowlog.PodRef{Namespace: "shop", Name: "web-1"}, DstPod: flowlog.PodRef{Namespace: "shop", Name: "web-3"}}
	e := flowlog.Event{Type: "open", Conn: c}
	printed := 0
	for _, stream := range []string{"web-1", "web-3"} { // both streams of n1 get it
		if f.keepFrom(taggedEvent{Event: e, Node: "n1", pod: stream}) {
			printed++
		}
	}
	if printed != 1 {
		t.Fatalf("a connection between two tapped pods printed %d times", printed)
	}
}
