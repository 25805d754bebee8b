package resolve

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"
)

func service() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			},
		},
	}
}

func slice(ready map[string]bool) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}},
	}
	for ip, r := range ready {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(r)},
			NodeName:   ptr.To("node-1"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "web-" + ip},
		})
	}
	return s
}

func run(t *testing.T, objs ...any) (*Resolver, *fake.Clientset) {
	t.Helper()
	client := fake.NewClientset()
	// The fake clientset's watches start "now" and replay nothing: an
	// object changed between an informer's List and its Watch is never
	// seen. Wait until both informers watch before changing anything.
	watching := make(chan string, 8)
	client.PrependWatchReactor("*", func(action k8stesting.Action) (bool, watch.Interface, error) {
		w, err := client.Tracker().Watch(action.GetResource(), action.GetNamespace())
		if err != nil {
			return false, nil, err
		}
		watching <- action.GetResource().Resource
		return true, w, nil
	})
	r, err := New(client, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	seen := map[string]bool{}
	for !seen["services"] || !seen["endpointslices"] {
		select {
		case res := <-watching:
			seen[res] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("informers not watching (seen %v)", seen)
		}
	}
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Service:
			if _, err := client.CoreV1().Services(o.Namespace).Create(ctx, o, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		case *discoveryv1.EndpointSlice:
			if _, err := client.DiscoveryV1().EndpointSlices(o.Namespace).Create(ctx, o, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	return r, client
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var vip = netip.MustParseAddrPort("10.96.0.10:80")

func TestResolveReadyEndpointsOnly(t *testing.T) {
	r, client := run(t, service(), slice(map[string]bool{"10.244.1.2": true, "10.244.2.3": true, "10.244.1.9": false}))
	waitFor(t, func() bool { _, ok, err := r.Resolve(vip); return ok && err == nil })
	seen := map[netip.AddrPort]int{}
	for i := 0; i < 200; i++ {
		ep, ok, err := r.Resolve(vip)
		if !ok || err != nil {
			t.Fatalf("Resolve: ok=%v err=%v", ok, err)
		}
		seen[ep.Addr]++
		if ep.Node != "node-1" || ep.Pod.Name == "" {
			t.Fatalf("endpoint without node/pod: %+v", ep)
		}
	}
	if len(seen) != 2 || seen[netip.MustParseAddrPort("10.244.1.9:8080")] != 0 {
		t.Fatalf("picked %v, want only the two ready endpoints on the target port 8080", seen)
	}

	// A not-a-service destination and a UDP port are not resolved.
	if _, ok, _ := r.Resolve(netip.MustParseAddrPort("10.244.1.2:8080")); ok {
		t.Error("a pod address resolved as a service")
	}
	if _, ok, _ := r.Resolve(netip.MustParseAddrPort("10.96.0.10:53")); ok {
		t.Error("a UDP service port resolved")
	}

	// All endpoints not ready: ErrNoEndpoints.
	s := slice(map[string]bool{"10.244.1.2": false})
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { _, _, err := r.Resolve(vip); return errors.Is(err, ErrNoEndpoints) })
}

// TestPowerOfTwoChoices: with active streams tracked, new picks avoid the
// loaded endpoint.
func TestPowerOfTwoChoices(t *testing.T) {
	r, _ := run(t, service(), slice(map[string]bool{"10.244.1.2": true, "10.244.2.3": true}))
	waitFor(t, func() bool { _, ok, err := r.Resolve(vip); return ok && err == nil })
	loaded := Endpoint{Addr: netip.MustParseAddrPort("10.244.1.2:8080")}
	var dones []func()
	for i := 0; i < 5; i++ {
		dones = append(dones, r.Track(loaded))
	}
	for i := 0; i < 50; i++ {
		ep, _, _ := r.Resolve(vip)
		if ep.Addr == loaded.Addr {
			t.Fatalf("picked the endpoint with 5 active streams over an idle one")
		}
	}
	for _, d := range dones {
		d()
		d() // idempotent
	}
	if n := r.load(loaded.Addr); n != 0 {
		t.Fatalf("active count %d after release", n)
	}
}

func TestServiceDeleted(t *testing.T) {
	r, client := run(t, service(), slice(map[string]bool{"10.244.1.2": true}))
	waitFor(t, func() bool { return r.IsService(vip) })
	if err := client.CoreV1().Services("default").Delete(context.Background(), "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return !r.IsService(vip) })
}

// TestCandidatesTerminatingFallback: as kube-proxy, ready endpoints are the
// candidates; only when none is ready, the serving-but-terminating ones
// are (a rolling update keeps working); a terminating endpoint that no
// longer serves never is.
func TestCandidatesTerminatingFallback(t *testing.T) {
	s := slice(map[string]bool{"10.244.1.5": false})
	s.Endpoints[0].Conditions.Serving = ptr.To(true)
	s.Endpoints[0].Conditions.Terminating = ptr.To(true)
	s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.244.1.6"},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(false), Terminating: ptr.To(true)}})
	r, client := run(t, service(), s)
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	waitFor(t, func() bool { _, ok, err := r.Candidates(vip); return ok && err == nil })
	eps, _, _ := r.Candidates(vip)
	if len(eps) != 1 || eps[0].Addr != netip.MustParseAddrPort("10.244.1.5:8080") {
		t.Fatalf("candidates %v, want only the serving terminating endpoint", eps)
	}
	s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.244.1.7"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		eps, _, _ := r.Candidates(vip)
		return len(eps) == 1 && eps[0].Addr == netip.MustParseAddrPort("10.244.1.7:8080")
	})
}

// TestDialServiceByEndpoints: a Service host name is dialled at its ready
// endpoint from the EndpointSlices (no DNS, no kube-proxy); other
// addresses go to the fallback unchanged.
func TestDialServiceByEndpoints(t *testing.T) {
	r, _ := run(t, service(), slice(map[string]bool{"10.244.1.5": true, "10.244.1.6": false}))
	waitFor(t, func() bool {
		eps, err := r.ServiceEndpoints(types.NamespacedName{Namespace: "default", Name: "web"}, 80)
		return err == nil && len(eps) == 1
	})
	var dialled []string
	dial := r.DialContext(func(_ context.Context, _, addr string) (net.Conn, error) {
		dialled = append(dialled, addr)
		return nil, errors.New("test dial")
	})
	_, _ = dial(context.Background(), "tcp", "web.default.svc:80")
	_, _ = dial(context.Background(), "tcp", "web.default.svc.cluster.local:80")
	_, _ = dial(context.Background(), "tcp", "10.0.0.1:8443")
	want := []string{"10.244.1.5:8080", "10.244.1.5:8080", "10.0.0.1:8443"}
	if !slices.Equal(dialled, want) {
		t.Fatalf("dialled %v, want %v", dialled, want)
	}
}
