package service

import (
	"errors"
	"net/http"
	"testing"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// TestCheckIdentity (item 6): the control plane's identities, the identity
// service's own among them, are never issued to workloads.
func TestCheckIdentity(t *testing.T) {
	for _, tc := range []struct {
		id   spiffe.ID
		want api.Code
	}{
		{spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "default"}, ""},
		{spiffe.ID{TrustDomain: "cluster.local", Namespace: "tunmesh", ServiceAccount: "tunmesh-identity"}, api.CodeReservedIdentity},
		{spiffe.ID{TrustDomain: "cluster.local", Namespace: "tunmesh", ServiceAccount: "tunmesh-node"}, api.CodeReservedIdentity},
		{spiffe.ID{TrustDomain: "other.example", Namespace: "prod", ServiceAccount: "default"}, api.CodeBadRequest},
	} {
		err := checkIdentity(tc.id, "cluster.local", "tunmesh")
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s refused: %v", tc.id, err)
			}
			continue
		}
		var ref *refusal
		if !errors.As(err, &ref) || ref.code != tc.want {
			t.Errorf("%s: err %v, want code %s", tc.id, err, tc.want)
		}
		if code, status := errorStatus(err); code == api.CodeReservedIdentity && status != http.StatusForbidden {
			t.Errorf("reserved identity answered %d, want 403", status)
		}
	}
}

// TestServingNameOutsideWorkloadNames: the serving certificate's name can
// never be a workload certificate's name.
func TestServingNameOutsideWorkloadNames(t *testing.T) {
	name := spiffe.ControlPlaneDNSName("tunmesh-identity", "tunmesh", "cluster.local")
	own := spiffe.ID{TrustDomain: "cluster.local", Namespace: "tunmesh", ServiceAccount: "tunmesh-identity"}
	if name == own.DNSName("tunmesh") {
		t.Fatalf("serving name %s equals the ServiceAccount's workload name", name)
	}
}
