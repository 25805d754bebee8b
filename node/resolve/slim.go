package resolve

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Every agent caches every Service and EndpointSlice of the cluster; the
// informers keep only what the resolver reads (the transform slim), not
// managedFields, kubectl's last-applied copy, topology hints or zones.
// A field not copied here reads as its zero value: code that starts
// reading another one must add it (and to TestSlimKeepsWhatResolveReads).

func slimMeta(m *metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name:            m.Name,
		Namespace:       m.Namespace,
		UID:             m.UID,
		ResourceVersion: m.ResourceVersion,
		Labels:          m.Labels, // an EndpointSlice's service name
	}
}

// slimService keeps the service's addresses and ports.
func slimService(s *corev1.Service) *corev1.Service {
	ports := make([]corev1.ServicePort, len(s.Spec.Ports))
	for i, p := range s.Spec.Ports {
		ports[i] = corev1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: p.Port}
	}
	return &corev1.Service{
		TypeMeta:   s.TypeMeta,
		ObjectMeta: slimMeta(&s.ObjectMeta),
		Spec: corev1.ServiceSpec{
			Type:       s.Spec.Type,
			ClusterIP:  s.Spec.ClusterIP,
			ClusterIPs: s.Spec.ClusterIPs,
			Ports:      ports,
		},
	}
}

// slimSlice keeps each endpoint's addresses, conditions, node and pod,
// and the ports.
func slimSlice(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	eps := make([]discoveryv1.Endpoint, len(s.Endpoints))
	for i, e := range s.Endpoints {
		eps[i] = discoveryv1.Endpoint{Addresses: e.Addresses, Conditions: e.Conditions, NodeName: e.NodeName}
		if e.TargetRef != nil {
			eps[i].TargetRef = &corev1.ObjectReference{Kind: e.TargetRef.Kind, Namespace: e.TargetRef.Namespace, Name: e.TargetRef.Name}
		}
	}
	return &discoveryv1.EndpointSlice{
		TypeMeta:    s.TypeMeta,
		ObjectMeta:  slimMeta(&s.ObjectMeta),
		AddressType: s.AddressType,
		Endpoints:   eps,
		Ports:       s.Ports,
	}
}

// slim is the informers' cache.TransformFunc; tombstones and anything
// unexpected pass unchanged.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return slimService(o), nil
	case *discoveryv1.EndpointSlice:
		return slimSlice(o), nil
	}
	return obj, nil
}
