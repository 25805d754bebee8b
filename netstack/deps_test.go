package netstack

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencyBoundary keeps netstack free of Kubernetes, TLS and the rest
// of tunmesh: it is the packet layer, and node/ builds on it, not the other
// way round.
func TestDependencyBoundary(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: go command not in PATH")
	}
	out, err := exec.Command(gobin, "list", "-deps",
		"github.com/tunmesh/tunmesh/netstack",
		"github.com/tunmesh/tunmesh/netstack/tun",
	).CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{"k8s.io/", "sigs.k8s.io/", "crypto/tls", "crypto/x509", "github.com/tunmesh/tunmesh/"}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/tunmesh/tunmesh/netstack") {
			continue
		}
		for _, f := range forbidden {
			if strings.HasPrefix(pkg, f) {
				t.Errorf("netstack depends on %s", pkg)
			}
		}
	}
}
