package dashboards

import (
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/nodemetrics"
)

// TestDashboardsUseTheAgentsSeries: both dashboards parse, every panel has
// a query, and every series a query names is one the agent registers (so
// a renamed metric breaks this test, not a dashboard in production).
func TestDashboardsUseTheAgentsSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := nodemetrics.New(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := flowlog.NewMetrics(reg, 0); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	known := map[string]bool{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		known[mf.GetName()] = true
	}
	// Vec series appear in Gather only once used: take their names from
	// what the agent's constructors register.
	rec := &recorder{names: known}
	if _, err := nodemetrics.New(rec); err != nil {
		t.Fatal(err)
	}
	if _, err := flowlog.NewMetrics(rec, 0); err != nil {
		t.Fatal(err)
	}
	ds, err := All()
	if err != nil {
		t.Fatal(err)
	}
	titles := map[string]bool{}
	name := regexp.MustCompile(`\b(tunmesh_[a-z_]+|process_[a-z_]+|go_[a-z_]+)\b`)
	for _, d := range ds {
		titles[d.Title] = true
		if len(d.Panels) == 0 {
			t.Errorf("%s: no panels", d.Title)
		}
		for _, p := range d.Panels {
			if len(p.Targets) == 0 {
				t.Errorf("%s / %s: no query", d.Title, p.Title)
			}
			for _, tg := range p.Targets {
				for _, m := range name.FindAllString(tg.Expr, -1) {
					base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")
					if !known[m] && !known[base] {
						t.Errorf("%s / %s: %s is not an agent series", d.Title, p.Title, m)
					}
				}
			}
		}
	}
	if !titles["tunmesh / Top Line"] || !titles["tunmesh / Node agent"] {
		t.Fatalf("dashboards %v", titles)
	}
}

// recorder is a Registerer that notes the names of what is registered.
type recorder struct{ names map[string]bool }

var fqName = regexp.MustCompile(`fqName: "([a-z_:]+)"`)

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			r.names[m[1]] = true
		}
	}
	return nil
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = r.Register(c)
	}
}

func (r *recorder) Unregister(prometheus.Collector) bool { return true }
