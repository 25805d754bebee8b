package mesh

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
)

// TestInstallerKeepsTunmeshChained: on every node tunmesh-cni-install has
// put the plugin into the node's CNI bin dir and chained it last in the
// conflist; when the primary CNI rewrites its file, it is re-patched.
func TestInstallerKeepsTunmeshChained(t *testing.T) {
	c := e2eenv.Need(t)
	plugins := func(path string) ([]string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		var conf struct {
			Plugins []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(b, &conf); err != nil {
			return nil, err
		}
		var types []string
		for _, p := range conf.Plugins {
			types = append(types, p.Type)
		}
		return types, nil
	}
	for _, n := range c.State.Nodes {
		nodeDir := filepath.Join(e2eenv.TestRoot, c.Name, "nodes", n.Name, "cni")
		conf := filepath.Join(nodeDir, "net.d", "10-bridge.conflist")
		got, err := plugins(conf)
		if err != nil || len(got) != 2 || got[0] != "bridge" || got[1] != "tunmesh-cni" {
			t.Fatalf("%s plugins %v (%v), want [bridge tunmesh-cni]", n.Name, got, err)
		}
		if st, err := os.Stat(filepath.Join(nodeDir, "bin", "tunmesh-cni")); err != nil || st.Mode()&0o111 == 0 {
			t.Fatalf("%s: tunmesh-cni not installed in the node's bin dir: %v", n.Name, err)
		}
	}

	// The primary CNI rewrites its config without us (as Calico or Cilium
	// do on upgrade): the installer puts the entry back.
	n := c.State.Nodes[0]
	conf := filepath.Join(e2eenv.TestRoot, c.Name, "nodes", n.Name, "cni", "net.d", "10-bridge.conflist")
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	raw["plugins"] = raw["plugins"].([]any)[:1]
	stripped, _ := json.MarshalIndent(raw, "", "  ")
	if err := os.WriteFile(conf+".primary.tmp", stripped, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(conf+".primary.tmp", conf); err != nil {
		t.Fatal(err)
	}
	e2eenv.WaitFor(t, 10*time.Second, "conflist re-patched", func() error {
		got, err := plugins(conf)
		if err != nil || len(got) != 2 || got[1] != "tunmesh-cni" {
			return fmt.Errorf("plugins %v (%v)", got, err)
		}
		return nil
	})
}
