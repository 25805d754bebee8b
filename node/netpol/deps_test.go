package netpol_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencyBoundary keeps the evaluator pure: it links neither
// client-go (the agent feeds it from its informers) nor the reference
// implementation, which is a test-only dependency.
func TestDependencyBoundary(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: go command not in PATH")
	}
	out, err := exec.Command(gobin, "list", "-deps", "github.com/tunmesh/tunmesh/node/netpol").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{"k8s.io/client-go/", "sigs.k8s.io/kube-network-policies/", "github.com/tunmesh/tunmesh/"}
	for _, pkg := range strings.Fields(string(out)) {
		if pkg == "github.com/tunmesh/tunmesh/node/netpol" {
			continue
		}
		for _, f := range forbidden {
			if strings.HasPrefix(pkg, f) {
				t.Errorf("node/netpol depends on %s", pkg)
			}
		}
	}
}
