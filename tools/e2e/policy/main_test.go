// Package policy runs the NetworkPolicy and authorization end-to-end tests
// against one local cluster with the mesh: the upstream NetworkPolicy e2e
// model (namespaces x, y, z with pods a, b, c serving 80 and 81) for
// meshed pods, plaintext clients from a namespace the mesh does not
// claim, the default inbound policy and the Authorization resource.
// Probes run in parallel from inside the pods' network namespaces.
package policy

import (
	"testing"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{Mesh: true}) }
