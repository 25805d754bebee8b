package policy

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestDefaultInbound(t *testing.T) {
	cfg := Config{ExcludedNamespaces: []string{"kube-system"}}
	const (
		tm = AnnotationDefaultInboundPolicy
		ld = LinkerdAnnotationDefaultInboundPolicy
	)
	for _, tc := range []struct {
		name     string
		pod, ns  a
		want     DefaultInbound
		errOn    string // object of the expected AnnotationError, "" for none
		errKey   string
		plain    bool // AllowsPlaintext
		meshedOK bool // AllowsMeshed
	}{
		{name: "default", want: AllUnauthenticated, plain: true, meshedOK: true},
		{name: "pod all-authenticated", pod: a{tm: "all-authenticated"}, want: AllAuthenticated, meshedOK: true},
		{name: "pod linkerd cluster-authenticated", pod: a{ld: "cluster-authenticated"}, want: ClusterAuthenticated, meshedOK: true},
		{name: "pod deny", pod: a{tm: "deny"}, want: Deny},
		{name: "linkerd cluster-unauthenticated", pod: a{ld: "cluster-unauthenticated"}, want: ClusterUnauthenticated, plain: true, meshedOK: true},
		{name: "namespace deny", ns: a{tm: "deny"}, want: Deny},
		{name: "namespace linkerd all-authenticated", ns: a{ld: "all-authenticated"}, want: AllAuthenticated, meshedOK: true},
		{name: "pod wins over namespace", pod: a{ld: "all-unauthenticated"}, ns: a{tm: "deny"}, want: AllUnauthenticated, plain: true, meshedOK: true},
		{name: "tunmesh key shadows linkerd key on one object", pod: a{tm: "deny", ld: "all-unauthenticated"}, want: Deny},
		// Fail closed: a bad value is deny, and does not fall back to the
		// namespace's (more open) value.
		{name: "bad pod value", pod: a{tm: "all_authenticated"}, ns: a{tm: "all-unauthenticated"}, want: Deny, errOn: podObj, errKey: tm},
		{name: "case matters", pod: a{ld: "Deny"}, want: Deny, errOn: podObj, errKey: ld},
		{name: "bad namespace value", ns: a{tm: ""}, want: Deny, errOn: nsObj, errKey: tm},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ns = testNS(tc.ns)
			got, errs := cfg.For(testPod(tc.pod), ns)
			if !got.Meshed {
				t.Fatalf("pod not meshed: %+v", got)
			}
			if got.DefaultInbound != tc.want {
				t.Errorf("DefaultInbound = %q, want %q", got.DefaultInbound, tc.want)
			}
			if got.DefaultInbound.AllowsPlaintext() != tc.plain || got.DefaultInbound.AllowsMeshed() != tc.meshedOK {
				t.Errorf("%s: AllowsPlaintext %v AllowsMeshed %v, want %v %v", got.DefaultInbound,
					got.DefaultInbound.AllowsPlaintext(), got.DefaultInbound.AllowsMeshed(), tc.plain, tc.meshedOK)
			}
			if tc.errOn == "" {
				if len(errs) != 0 {
					t.Fatalf("errors %v, want none", errs)
				}
				return
			}
			if len(errs) != 1 {
				t.Fatalf("errors %v, want one", errs)
			}
			var ae *AnnotationError
			if !errors.As(errs[0], &ae) || ae.Object != tc.errOn || ae.Key != tc.errKey || !errors.Is(errs[0], ErrInvalidDefaultInbound) || !errors.Is(errs[0], ErrInvalidAnnotation) {
				t.Fatalf("error %v, want an AnnotationError on %s %s wrapping ErrInvalidDefaultInbound", errs[0], tc.errOn, tc.errKey)
			}
		})
	}
}

func TestDefaultInboundNotMeshed(t *testing.T) {
	p, errs := Config{ExcludedNamespaces: []string{"shop"}}.For(testPod(a{AnnotationDefaultInboundPolicy: "bogus"}), nil)
	if p.Meshed || p.DefaultInbound != "" || len(errs) != 0 {
		t.Fatalf("excluded pod: %+v %v, want not meshed, no inbound policy, no errors", p, errs)
	}
}

// FuzzParseDefaultInbound: never panics, accepts exactly the five names,
// errors wrap ErrInvalidDefaultInbound.
func FuzzParseDefaultInbound(f *testing.F) {
	for _, s := range []string{"deny", "all-authenticated", "cluster-authenticated", "all-unauthenticated", "cluster-unauthenticated", "", "Deny", " deny"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDefaultInbound(s)
		known := s == "deny" || s == "all-authenticated" || s == "cluster-authenticated" || s == "all-unauthenticated" || s == "cluster-unauthenticated"
		if known != (err == nil) {
			t.Fatalf("ParseDefaultInbound(%q) = %q, %v", s, d, err)
		}
		if err != nil && !errors.Is(err, ErrInvalidDefaultInbound) {
			t.Fatalf("error %v does not wrap ErrInvalidDefaultInbound", err)
		}
		if err == nil && string(d) != s {
			t.Fatalf("ParseDefaultInbound(%q) = %q", s, d)
		}
	})
}

// TestDefaultInboundForIgnoresInject (review finding 7): the default
// inbound policy is resolved whatever the inject setting says, so a pod
// still attached after opting out keeps the policy it declares.
func TestDefaultInboundForIgnoresInject(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "api",
		Annotations: map[string]string{AnnotationInject: "disabled"}}}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "prod",
		Annotations: map[string]string{AnnotationDefaultInboundPolicy: "deny"}}}
	if p, _ := (Config{}).For(pod, ns); p.Meshed || p.DefaultInbound != "" {
		t.Fatalf("For: %+v, want not meshed (the case this covers)", p)
	}
	if d, err := DefaultInboundFor(pod, ns); err != nil || d != Deny {
		t.Fatalf("DefaultInboundFor = %q, %v; want deny from the namespace", d, err)
	}
	pod.Annotations[AnnotationDefaultInboundPolicy] = "bogus"
	if d, err := DefaultInboundFor(pod, ns); !errors.Is(err, ErrInvalidDefaultInbound) || d != Deny {
		t.Fatalf("bad value: %q, %v; want deny and ErrInvalidDefaultInbound", d, err)
	}
	other := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "dev", Annotations: map[string]string{AnnotationDefaultInboundPolicy: "deny"}}}
	delete(pod.Annotations, AnnotationDefaultInboundPolicy)
	if d, err := DefaultInboundFor(pod, other); err != nil || d != AllUnauthenticated {
		t.Fatalf("another namespace's object: %q, %v; want it ignored", d, err)
	}
}
