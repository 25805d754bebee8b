// Package realnode runs the end-to-end tests on a local cluster whose
// nodes are real kubelets with containerd and runc (dev up --real-nodes),
// with tunmesh's images built from this checkout and imported into every
// node: the node basics (scheduling, cross-node pods, kubectl logs/exec,
// per-node host paths), then tunmesh installed as a user does (tunmeshctl
// install | kubectl apply -f -) and its data plane, Jobs, agent restarts,
// rollouts and uninstall. Teardown proves the host is as before (see
// package e2eenv).
package realnode

import (
	"testing"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{RealNodes: true}) }
