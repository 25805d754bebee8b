package policy

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// a is shorthand for an annotation map.
type a = map[string]string

func testPod(annotations a) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-0", Annotations: annotations}}
}

func testNS(annotations a) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Annotations: annotations}}
}

// wantErr describes one expected *AnnotationError.
type wantErr struct {
	object, key, value string
	ports              bool // also wraps ErrInvalidPorts
}

var (
	podObj = `pod "shop/web-0"`
	nsObj  = `namespace "shop"`
)

func TestFor(t *testing.T) {
	meshed := func(in, out string) Policy {
		return Policy{Meshed: true, SkipInbound: mustParse(t, in), SkipOutbound: mustParse(t, out)}
	}
	notMeshed := func(reason string) Policy { return Policy{Reason: reason} }
	hostNet := func(p *corev1.Pod) *corev1.Pod { p.Spec.HostNetwork = true; return p }
	cfg := Config{ExcludedNamespaces: []string{"kube-system", "tunmesh"}}

	tests := []struct {
		name    string
		cfg     Config
		pod     *corev1.Pod
		ns      *corev1.Namespace // nil: not known
		want    Policy
		wantErr []wantErr
	}{
		// Defaults.
		{name: "no annotations, no namespace", pod: testPod(nil), want: meshed("", "")},
		{name: "no annotations anywhere", pod: testPod(nil), ns: testNS(nil), want: meshed("", "")},

		// Inject, each key on each object.
		{name: "pod tunmesh disabled", pod: testPod(a{AnnotationInject: "disabled"}), want: notMeshed(ReasonInjectDisabled)},
		{name: "pod tunmesh enabled", pod: testPod(a{AnnotationInject: "enabled"}), want: meshed("", "")},
		{name: "pod linkerd disabled", pod: testPod(a{LinkerdAnnotationInject: "disabled"}), want: notMeshed(ReasonInjectDisabled)},
		{name: "pod linkerd enabled", pod: testPod(a{LinkerdAnnotationInject: "enabled"}), want: meshed("", "")},
		{name: "pod linkerd ingress", pod: testPod(a{LinkerdAnnotationInject: "ingress"}), want: meshed("", "")},
		{name: "ns tunmesh disabled", pod: testPod(nil), ns: testNS(a{AnnotationInject: "disabled"}), want: notMeshed(ReasonInjectDisabled)},
		{name: "ns linkerd disabled", pod: testPod(nil), ns: testNS(a{LinkerdAnnotationInject: "disabled"}), want: notMeshed(ReasonInjectDisabled)},
		{name: "ns tunmesh enabled", pod: testPod(nil), ns: testNS(a{AnnotationInject: "enabled"}), want: meshed("", "")},

		// Inject precedence.
		{
			name: "pod enabled overrides ns disabled",
			pod:  testPod(a{AnnotationInject: "enabled"}), ns: testNS(a{AnnotationInject: "disabled"}),
			want: meshed("", ""),
		},
		{
			name: "pod disabled overrides ns enabled",
			pod:  testPod(a{AnnotationInject: "disabled"}), ns: testNS(a{AnnotationInject: "enabled"}),
			want: notMeshed(ReasonInjectDisabled),
		},
		{
			name: "pod linkerd enabled overrides ns tunmesh disabled",
			pod:  testPod(a{LinkerdAnnotationInject: "enabled"}), ns: testNS(a{AnnotationInject: "disabled"}),
			want: meshed("", ""),
		},
		{
			name: "pod tunmesh enabled shadows pod linkerd disabled",
			pod:  testPod(a{AnnotationInject: "enabled", LinkerdAnnotationInject: "disabled"}),
			want: meshed("", ""),
		},
		{
			name: "pod tunmesh disabled shadows pod linkerd enabled",
			pod:  testPod(a{AnnotationInject: "disabled", LinkerdAnnotationInject: "enabled"}),
			want: notMeshed(ReasonInjectDisabled),
		},
		{
			name: "ns tunmesh enabled shadows ns linkerd disabled",
			pod:  testPod(nil), ns: testNS(a{AnnotationInject: "enabled", LinkerdAnnotationInject: "disabled"}),
			want: meshed("", ""),
		},
		{
			name: "nil ns: only the pod counts",
			pod:  testPod(a{AnnotationSkipInboundPorts: "25"}),
			want: meshed("25", ""),
		},

		// Skip lists, each key on each object.
		{name: "pod tunmesh skip inbound", pod: testPod(a{AnnotationSkipInboundPorts: "25, 8080-8090"}), ns: testNS(nil), want: meshed("25,8080-8090", "")},
		{name: "pod tunmesh skip outbound", pod: testPod(a{AnnotationSkipOutboundPorts: "3306"}), ns: testNS(nil), want: meshed("", "3306")},
		{name: "pod linkerd skip inbound", pod: testPod(a{LinkerdAnnotationSkipInboundPorts: "4190,4191,"}), want: meshed("4190-4191", "")},
		{name: "pod linkerd skip outbound", pod: testPod(a{LinkerdAnnotationSkipOutboundPorts: "443"}), want: meshed("", "443")},
		{name: "ns tunmesh skip inbound", pod: testPod(nil), ns: testNS(a{AnnotationSkipInboundPorts: "25"}), want: meshed("25", "")},
		{name: "ns tunmesh skip outbound", pod: testPod(nil), ns: testNS(a{AnnotationSkipOutboundPorts: "25"}), want: meshed("", "25")},
		{name: "ns linkerd skip inbound", pod: testPod(nil), ns: testNS(a{LinkerdAnnotationSkipInboundPorts: "25"}), want: meshed("25", "")},
		{name: "ns linkerd skip outbound", pod: testPod(nil), ns: testNS(a{LinkerdAnnotationSkipOutboundPorts: "25"}), want: meshed("", "25")},

		// Skip precedence: each setting resolved on its own.
		{
			name: "pod list overrides ns list",
			pod:  testPod(a{AnnotationSkipInboundPorts: "80"}), ns: testNS(a{AnnotationSkipInboundPorts: "443"}),
			want: meshed("80", ""),
		},
		{
			name: "pod inbound, ns outbound",
			pod:  testPod(a{AnnotationSkipInboundPorts: "80"}), ns: testNS(a{AnnotationSkipOutboundPorts: "443"}),
			want: meshed("80", "443"),
		},
		{
			name: "pod empty list overrides ns list",
			pod:  testPod(a{AnnotationSkipOutboundPorts: ""}), ns: testNS(a{AnnotationSkipOutboundPorts: "443"}),
			want: meshed("", ""),
		},
		{
			name: "pod linkerd list overrides ns tunmesh list",
			pod:  testPod(a{LinkerdAnnotationSkipInboundPorts: "80"}), ns: testNS(a{AnnotationSkipInboundPorts: "443"}),
			want: meshed("80", ""),
		},
		{
			name: "tunmesh list shadows linkerd list on the pod",
			pod: testPod(a{
				AnnotationSkipInboundPorts: "80", LinkerdAnnotationSkipInboundPorts: "443",
				AnnotationSkipOutboundPorts: "25", LinkerdAnnotationSkipOutboundPorts: "587",
			}),
			want: meshed("80", "25"),
		},
		{
			name: "tunmesh list shadows linkerd list on the ns",
			pod:  testPod(nil), ns: testNS(a{AnnotationSkipInboundPorts: "80", LinkerdAnnotationSkipInboundPorts: "443"}),
			want: meshed("80", ""),
		},
		{
			name: "shadowed bad linkerd values are not validated",
			pod: testPod(a{
				AnnotationInject: "enabled", LinkerdAnnotationInject: "bogus",
				AnnotationSkipInboundPorts: "80", LinkerdAnnotationSkipInboundPorts: "80-",
			}),
			want: meshed("80", ""),
		},
		{
			name: "ns inject disabled is overridden, ns skip lists still apply",
			pod:  testPod(a{AnnotationInject: "enabled"}),
			ns:   testNS(a{AnnotationInject: "disabled", AnnotationSkipInboundPorts: "25", LinkerdAnnotationSkipOutboundPorts: "443"}),
			want: meshed("25", "443"),
		},

		// Not meshed whatever the annotations say.
		{
			name: "hostNetwork",
			pod:  hostNet(testPod(a{AnnotationInject: "enabled", AnnotationSkipInboundPorts: "80"})),
			want: notMeshed(ReasonHostNetwork),
		},
		{
			name: "hostNetwork reads no annotations, so reports no bad ones",
			pod:  hostNet(testPod(a{AnnotationInject: "bogus", AnnotationSkipInboundPorts: "0"})),
			ns:   testNS(a{AnnotationSkipOutboundPorts: "x"}),
			want: notMeshed(ReasonHostNetwork),
		},
		{
			name: "excluded namespace",
			cfg:  cfg,
			pod:  &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "coredns", Annotations: a{AnnotationInject: "enabled"}}},
			ns:   &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kube-system", Annotations: a{AnnotationInject: "enabled"}}},
			want: notMeshed(ReasonExcludedNamespace),
		},
		{
			name: "tunmesh's own namespace, bad annotations not reported",
			cfg:  cfg,
			pod:  &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "tunmesh", Name: "identity", Annotations: a{AnnotationSkipInboundPorts: "-"}}},
			want: notMeshed(ReasonExcludedNamespace),
		},
		{
			name: "namespace not in the excluded list",
			cfg:  cfg,
			pod:  testPod(nil), ns: testNS(nil),
			want: meshed("", ""),
		},
		{
			name: "hostNetwork wins over excluded namespace",
			cfg:  cfg,
			pod:  hostNet(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kube-proxy"}}),
			want: notMeshed(ReasonHostNetwork),
		},
		{
			name: "inject disabled: skip lists not read",
			pod:  testPod(a{AnnotationInject: "disabled", AnnotationSkipInboundPorts: "80-"}),
			ns:   testNS(a{AnnotationSkipOutboundPorts: "443"}),
			want: notMeshed(ReasonInjectDisabled),
		},

		// Bad values: an error each, the rest still applies.
		{
			name:    "bad pod inject value means enabled, skip lists apply",
			pod:     testPod(a{AnnotationInject: "Disabled", AnnotationSkipInboundPorts: "80"}),
			ns:      testNS(a{AnnotationSkipOutboundPorts: "443"}),
			want:    meshed("80", "443"),
			wantErr: []wantErr{{object: podObj, key: AnnotationInject, value: "Disabled"}},
		},
		{
			name:    "bad pod inject value does not fall back to ns disabled",
			pod:     testPod(a{AnnotationInject: "no"}),
			ns:      testNS(a{AnnotationInject: "disabled"}),
			want:    meshed("", ""),
			wantErr: []wantErr{{object: podObj, key: AnnotationInject, value: "no"}},
		},
		{
			name:    "tunmesh inject does not take linkerd's ingress",
			pod:     testPod(a{AnnotationInject: "ingress"}),
			want:    meshed("", ""),
			wantErr: []wantErr{{object: podObj, key: AnnotationInject, value: "ingress"}},
		},
		{
			name:    "empty inject value",
			pod:     testPod(a{LinkerdAnnotationInject: ""}),
			want:    meshed("", ""),
			wantErr: []wantErr{{object: podObj, key: LinkerdAnnotationInject, value: ""}},
		},
		{
			name:    "inject value with spaces",
			pod:     testPod(nil),
			ns:      testNS(a{AnnotationInject: " disabled"}),
			want:    meshed("", ""),
			wantErr: []wantErr{{object: nsObj, key: AnnotationInject, value: " disabled"}},
		},
		{
			name:    "bad pod inbound list is empty, not the ns list; outbound applies",
			pod:     testPod(a{AnnotationSkipInboundPorts: "80-", AnnotationSkipOutboundPorts: "3306"}),
			ns:      testNS(a{AnnotationSkipInboundPorts: "443"}),
			want:    meshed("", "3306"),
			wantErr: []wantErr{{object: podObj, key: AnnotationSkipInboundPorts, value: "80-", ports: true}},
		},
		{
			name:    "bad linkerd outbound list on the ns",
			pod:     testPod(a{AnnotationSkipInboundPorts: "25"}),
			ns:      testNS(a{LinkerdAnnotationSkipOutboundPorts: "a-b"}),
			want:    meshed("25", ""),
			wantErr: []wantErr{{object: nsObj, key: LinkerdAnnotationSkipOutboundPorts, value: "a-b", ports: true}},
		},
		{
			name: "every value bad: three errors, default policy",
			pod: testPod(a{
				LinkerdAnnotationInject:            "yes",
				AnnotationSkipInboundPorts:         "0",
				LinkerdAnnotationSkipOutboundPorts: "65536",
			}),
			want: meshed("", ""),
			wantErr: []wantErr{
				{object: podObj, key: LinkerdAnnotationInject, value: "yes"},
				{object: podObj, key: AnnotationSkipInboundPorts, value: "0", ports: true},
				{object: podObj, key: LinkerdAnnotationSkipOutboundPorts, value: "65536", ports: true},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := tt.cfg.For(tt.pod, tt.ns)
			checkPolicy(t, got, tt.want)
			if len(errs) != len(tt.wantErr) {
				t.Fatalf("For() errors = %v, want %d", errs, len(tt.wantErr))
			}
			for i, err := range errs {
				checkAnnotationError(t, err, tt.wantErr[i])
			}
		})
	}
}

func checkPolicy(t *testing.T, got, want Policy) {
	t.Helper()
	if got.Meshed != want.Meshed || got.Reason != want.Reason ||
		!got.SkipInbound.Equal(want.SkipInbound) || !got.SkipOutbound.Equal(want.SkipOutbound) {
		t.Errorf("For() = {Meshed:%v Reason:%q SkipInbound:%q SkipOutbound:%q}, want {Meshed:%v Reason:%q SkipInbound:%q SkipOutbound:%q}",
			got.Meshed, got.Reason, got.SkipInbound, got.SkipOutbound,
			want.Meshed, want.Reason, want.SkipInbound, want.SkipOutbound)
	}
	if got.Meshed != (got.Reason == "") {
		t.Errorf("For() Meshed = %v with Reason %q", got.Meshed, got.Reason)
	}
}

func checkAnnotationError(t *testing.T, err error, want wantErr) {
	t.Helper()
	if !errors.Is(err, ErrInvalidAnnotation) {
		t.Errorf("error %v does not wrap ErrInvalidAnnotation", err)
	}
	if errors.Is(err, ErrInvalidPorts) != want.ports {
		t.Errorf("error %v: errors.Is(ErrInvalidPorts) = %v, want %v", err, !want.ports, want.ports)
	}
	var ae *AnnotationError
	if !errors.As(err, &ae) {
		t.Fatalf("error %v is not an *AnnotationError", err)
	}
	if ae.Object != want.object || ae.Key != want.key || ae.Value != want.value {
		t.Errorf("error names %s %s=%q, want %s %s=%q", ae.Object, ae.Key, ae.Value, want.object, want.key, want.value)
	}
	// The message alone must let a user find and fix the value.
	msg := err.Error()
	for _, s := range []string{want.object, want.key, `"` + want.value + `"`} {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q does not contain %s", msg, s)
		}
	}
}

// TestForErrorMessage pins the text users see in the pod's Warning event.
func TestForErrorMessage(t *testing.T) {
	_, errs := Config{}.For(testPod(a{AnnotationSkipInboundPorts: "25, 8080-"}), nil)
	if len(errs) != 1 {
		t.Fatalf("errors = %v, want 1", errs)
	}
	want := `pod "shop/web-0": invalid annotation config.tunmesh.io/skip-inbound-ports="25, 8080-": ` +
		`invalid port list: item 2 "8080-": range has no upper bound; ignored: no inbound ports skipped`
	if got := errs[0].Error(); got != want {
		t.Errorf("error =\n%s\nwant\n%s", got, want)
	}

	_, errs = Config{}.For(testPod(a{AnnotationInject: "off"}), nil)
	want = `pod "shop/web-0": invalid annotation tunmesh.io/inject="off": want "enabled" or "disabled"; using the default: enabled`
	if len(errs) != 1 || errs[0].Error() != want {
		t.Errorf("errors = %v, want [%s]", errs, want)
	}

	// Huge values are cut so the event stays readable.
	huge := strings.Repeat("x", 10000)
	_, errs = Config{}.For(testPod(a{AnnotationInject: huge}), nil)
	if len(errs) != 1 {
		t.Fatalf("errors = %v, want 1", errs)
	}
	if n := len(errs[0].Error()); n > 300 {
		t.Errorf("error for a huge value is %d bytes", n)
	}
}

func TestForNamespaceMismatch(t *testing.T) {
	other := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "other", Annotations: a{AnnotationInject: "disabled"}}}
	got, errs := Config{}.For(testPod(a{AnnotationSkipOutboundPorts: "53"}), other)
	// The wrong namespace is ignored, the pod's own annotations still apply.
	checkPolicy(t, got, Policy{Meshed: true, SkipOutbound: mustParse(t, "53")})
	if len(errs) != 1 || !errors.Is(errs[0], ErrNamespaceMismatch) || errors.Is(errs[0], ErrInvalidAnnotation) {
		t.Fatalf("errors = %v, want one wrapping only ErrNamespaceMismatch", errs)
	}
	if msg := errs[0].Error(); !strings.Contains(msg, `"shop/web-0"`) || !strings.Contains(msg, `"other"`) {
		t.Errorf("error %q does not name the pod and the namespace", msg)
	}
}

func TestPolicySkips(t *testing.T) {
	p, errs := Config{}.For(testPod(a{AnnotationSkipInboundPorts: "25,8080-8090", AnnotationSkipOutboundPorts: "3306"}), nil)
	if len(errs) != 0 {
		t.Fatalf("errors: %v", errs)
	}
	tests := []struct {
		port          uint16
		inbound, outb bool
	}{
		{0, false, false},
		{25, true, false},
		{8085, true, false},
		{8091, false, false},
		{3306, false, true},
		{65535, false, false},
	}
	for _, tt := range tests {
		if got := p.SkipsInbound(tt.port); got != tt.inbound {
			t.Errorf("SkipsInbound(%d) = %v, want %v", tt.port, got, tt.inbound)
		}
		if got := p.SkipsOutbound(tt.port); got != tt.outb {
			t.Errorf("SkipsOutbound(%d) = %v, want %v", tt.port, got, tt.outb)
		}
	}
	var unmeshed Policy
	if unmeshed.SkipsInbound(25) || unmeshed.SkipsOutbound(25) {
		t.Error("zero Policy skips a port")
	}
}
