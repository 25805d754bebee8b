// Package observe runs the observability end-to-end tests on one local
// cluster with the mesh: tunmeshctl capture (pod side in plaintext, wire
// side only TLS, both read by tshark), access (denied without the Role,
// allowed with it), edges (SECURED with both identities, the reason for a
// skipped port and for a probe), tap (open/req/rsp/end/close of a meshed
// request, tls=not_provided_by_remote for a probe), the dashboards' queries
// against a real Prometheus scraping the agents, and check --proxy.
package observe

import (
	"testing"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) { e2eenv.Main(m, e2eenv.Options{Mesh: true}) }
