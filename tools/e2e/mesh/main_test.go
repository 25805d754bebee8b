// Package mesh runs the data-path end-to-end tests against one local
// cluster with the mesh (tunmesh-identity, an agent per node, tunmesh-cni
// chained after the bridge plugin). The tests open sockets inside pod
// network namespaces directly, so traffic takes exactly the path an
// application's would: the pod's routing, tm0, the agents, the underlay.
package mesh

import (
	"testing"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{Mesh: true}) }
