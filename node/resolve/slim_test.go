package resolve

import (
	"encoding/json"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

func TestSlimKeepsWhatResolveReads(t *testing.T) {
	mf := []metav1.ManagedFieldsEntry{{Manager: "kube-controller-manager", FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:endpoints":{}}`)}}}
	svc := service()
	svc.ManagedFields = mf
	svc.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}
	svc.Spec.Selector = map[string]string{"app": "web"}
	svc.Spec.Ports[0].TargetPort.IntVal = 8080

	s := slimService(svc)
	if s.Name != svc.Name || s.Namespace != svc.Namespace || s.Spec.ClusterIP != svc.Spec.ClusterIP || len(s.Spec.ClusterIPs) != 1 {
		t.Errorf("service identity or addresses lost: %+v", s)
	}
	if len(s.Spec.Ports) != 2 || s.Spec.Ports[0] != (corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}) ||
		s.Spec.Ports[1].Protocol != corev1.ProtocolUDP {
		t.Errorf("service ports %+v", s.Spec.Ports)
	}
	if s.ManagedFields != nil || s.Annotations != nil || s.Spec.Selector != nil {
		t.Errorf("service kept managedFields, annotations or selector: %+v", s.ObjectMeta)
	}

	es := slice(map[string]bool{"10.244.1.5": true})
	es.ManagedFields = mf
	es.Endpoints[0].Zone = ptr.To("zone-a")
	es.Endpoints[0].Hostname = ptr.To("web-0")
	es.Endpoints[0].Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "zone-a"}}}
	es.Endpoints[0].Conditions.Serving = ptr.To(true)
	es.Endpoints[0].Conditions.Terminating = ptr.To(false)
	es.Endpoints[0].TargetRef.UID = "uid-1"
	ss := slimSlice(es)
	if ss.Labels[discoveryv1.LabelServiceName] != "web" || ss.Name != es.Name || ss.AddressType != es.AddressType {
		t.Errorf("slice metadata lost: %+v", ss.ObjectMeta)
	}
	want := discoveryv1.Endpoint{
		Addresses:  []string{"10.244.1.5"},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		NodeName:   ptr.To("node-1"),
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "web-10.244.1.5"},
	}
	gj, _ := json.Marshal(ss.Endpoints)
	wj, _ := json.Marshal([]discoveryv1.Endpoint{want})
	if string(gj) != string(wj) {
		t.Errorf("endpoints %s, want %s", gj, wj)
	}
	pj, _ := json.Marshal(ss.Ports)
	wpj, _ := json.Marshal(es.Ports)
	if string(pj) != string(wpj) {
		t.Errorf("ports %s, want %s", pj, wpj)
	}
	if ss.ManagedFields != nil {
		t.Error("slice kept managedFields")
	}
	if es.Endpoints[0].Zone == nil || es.ManagedFields == nil {
		t.Error("slimSlice changed the original")
	}

	tomb := cache.DeletedFinalStateUnknown{Key: "default/web", Obj: svc}
	if got, err := slim(tomb); err != nil || got != any(tomb) {
		t.Errorf("tombstone: %v, %v", got, err)
	}
}
