// Package wireguard runs the end-to-end tests of the WireGuard transport
// against one local cluster brought up with
// `tunmeshctl dev up --transport wireguard --encrypt-all`: meshed
// transfers, UDP between pods, what the underlay carries, agent restarts,
// key rotation, garbage datagrams, same-node traffic.
package wireguard

import (
	"testing"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

func TestMain(m *testing.M) {
	e2eenv.Main(m, e2eenv.Options{Mesh: true, UpArgs: []string{"--transport", "wireguard", "--encrypt-all"}})
}
