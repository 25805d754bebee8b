package nodemetrics

import (
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tunmesh/tunmesh/netstack"
)

// TestStackCollectorExportsEveryField fills every numeric NICStats field
// with its own value and checks that each value is exported exactly once,
// under the pod's name: a counter added to NICStats without a metric, or
// two metrics reading one field, fails here.
func TestStackCollectorExportsEveryField(t *testing.T) {
	var st netstack.NICStats
	st.Name = "ns/pod"
	v := reflect.ValueOf(&st).Elem()
	want := map[float64]string{}
	next := 1
	for i := range v.NumField() {
		f := v.Field(i)
		name := v.Type().Field(i).Name
		switch f.Kind() {
		case reflect.Uint64:
			f.SetUint(uint64(next))
		case reflect.Int:
			f.SetInt(int64(next))
		default:
			continue
		}
		if name == "ID" {
			continue
		}
		want[float64(next)] = name
		next++
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(StackCollector{Stats: func() []netstack.NICStats { return []netstack.NICStats{st} }})
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[float64]string{}
	for _, mf := range families {
		if len(mf.Metric) != 1 {
			t.Fatalf("%s: %d series, want 1", mf.GetName(), len(mf.Metric))
		}
		m := mf.Metric[0]
		if len(m.Label) != 1 || m.Label[0].GetName() != "pod" || m.Label[0].GetValue() != "ns/pod" {
			t.Errorf("%s: labels %v, want pod=ns/pod", mf.GetName(), m.Label)
		}
		var val float64
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			val = m.Counter.GetValue()
			if !strings.HasSuffix(mf.GetName(), "_total") {
				t.Errorf("counter %s does not end in _total", mf.GetName())
			}
		case dto.MetricType_GAUGE:
			val = m.Gauge.GetValue()
		default:
			t.Fatalf("%s: type %v", mf.GetName(), mf.GetType())
		}
		if other, dup := seen[val]; dup {
			t.Errorf("%s and %s export the same field", mf.GetName(), other)
		}
		seen[val] = mf.GetName()
	}
	for val, field := range want {
		if _, ok := seen[val]; !ok {
			t.Errorf("NICStats.%s is not exported", field)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("%d metrics for %d fields", len(seen), len(want))
	}
}

// TestStackCollectorBesideNodeMetrics: the per-pod metrics register in the
// agent's registry beside the node's own, with no name taken twice.
func TestStackCollectorBesideNodeMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	if _, err := New(reg); err != nil {
		t.Fatal(err)
	}
	if err := reg.Register(StackCollector{Stats: func() []netstack.NICStats { return []netstack.NICStats{{Name: "ns/pod"}} }}); err != nil {
		t.Fatalf("register beside the node metrics: %v", err)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

// TestStackCollectorSameNameTwice: two NICs of one name (a stale NIC beside
// its pod's new one) give one series per field, their sum, and the scrape
// does not fail.
func TestStackCollectorSameNameTwice(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(StackCollector{Stats: func() []netstack.NICStats {
		return []netstack.NICStats{{ID: 1, Name: "ns/pod", SpoofedDrops: 2, TrackedFlows: 1}, {ID: 2, Name: "ns/pod", SpoofedDrops: 3, TrackedFlows: 4}, {ID: 3, Name: "ns/other", SpoofedDrops: 7}}
	}})
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("scrape failed: %v", err)
	}
	got := map[string]float64{}
	for _, mf := range families {
		for _, m := range mf.Metric {
			key := mf.GetName() + "/" + m.Label[0].GetValue()
			if m.Counter != nil {
				got[key] = m.Counter.GetValue()
			} else {
				got[key] = m.Gauge.GetValue()
			}
		}
	}
	for key, want := range map[string]float64{
		"tunmesh_node_spoofed_packets_total/ns/pod":   5,
		"tunmesh_node_spoofed_packets_total/ns/other": 7,
		"tunmesh_node_tracked_flows/ns/pod":           5,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
}
