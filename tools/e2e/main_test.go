// Package e2e runs the foundation and identity end-to-end tests against
// one local cluster without the mesh, shared by every test of the package
// (see package e2eenv).
package e2e

import (
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

type cluster = e2eenv.Cluster

const testRoot = e2eenv.TestRoot

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{}) }

func need(t testing.TB) *cluster { return e2eenv.Need(t) }

func waitFor(t *testing.T, timeout time.Duration, what string, try func() error) {
	t.Helper()
	e2eenv.WaitFor(t, timeout, what, try)
}

var (
	podReady     = e2eenv.PodReady
	randomSuffix = e2eenv.RandomSuffix
)
