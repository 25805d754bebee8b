// Package dashboards holds tunmesh's Grafana dashboards (JSON, import them
// in Grafana with a Prometheus data source that scrapes the agents' admin
// port, :4191/metrics): "Top Line" (per workload: HTTP success rate, RPS,
// latency, secured vs not) and "Node agent" (pods, connections, bytes, CPU,
// memory, tunnel set-up, refusals). See docs/observability.md.
package dashboards

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"sort"
)

//go:embed *.json
var Files embed.FS

// Dashboard is the part of a Grafana dashboard the tests read.
type Dashboard struct {
	UID    string  `json:"uid"`
	Title  string  `json:"title"`
	Panels []Panel `json:"panels"`
}

// Panel is one graph and its queries.
type Panel struct {
	Title   string   `json:"title"`
	Type    string   `json:"type"`
	Targets []Target `json:"targets"`
}

// Target is one PromQL query.
type Target struct {
	RefID string `json:"refId"`
	Expr  string `json:"expr"`
}

// All parses every dashboard, sorted by file name.
func All() ([]Dashboard, error) {
	names, err := fs.Glob(Files, "*.json")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []Dashboard
	for _, n := range names {
		b, err := Files.ReadFile(n)
		if err != nil {
			return nil, err
		}
		var d Dashboard
		if err := json.Unmarshal(b, &d); err != nil {
			return nil, fmt.Errorf("dashboard %s: %w", n, err)
		}
		out = append(out, d)
	}
	return out, nil
}
