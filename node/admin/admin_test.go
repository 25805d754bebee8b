package admin

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestCheckCNIConf(t *testing.T) {
	for _, tc := range []struct {
		name    string
		files   map[string]string
		file    string
		chained bool
		err     bool
	}{
		{"chained conflist", map[string]string{"10-bridge.conflist": `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"tunmesh-cni"}]}`}, "10-bridge.conflist", true, false},
		{"not chained", map[string]string{"10-bridge.conflist": `{"plugins":[{"type":"bridge"}]}`}, "10-bridge.conflist", false, false},
		{"first file wins", map[string]string{"05-other.conf": `{"type":"bridge"}`, "10-bridge.conflist": `{"plugins":[{"type":"tunmesh-cni"}]}`}, "05-other.conf", false, false},
		{"other files ignored", map[string]string{"README": "x", "10-a.conflist": `{"plugins":[{"type":"tunmesh-cni"}]}`}, "10-a.conflist", true, false},
		{"unparsable", map[string]string{"10-a.conflist": `{`}, "10-a.conflist", false, true},
		{"empty dir", nil, "", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for n, c := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			r := CheckCNIConf(dir)
			if r.File != tc.file || r.Chained != tc.chained || (r.Error != "") != tc.err {
				t.Fatalf("report %+v, want file %q chained %v error %v", r, tc.file, tc.chained, tc.err)
			}
		})
	}
}

// TestReadyAndStatus: readiness fails naming the first failing check; the
// status report lists all, with the version.
func TestReadyAndStatus(t *testing.T) {
	h := Handler(Config{Gatherer: prometheus.NewRegistry(), Version: "v1.2.3", Node: "n1", CNIConfDir: t.TempDir(),
		Ready: []Check{{"informers", func() error { return nil }}, {"mesh listener", func() error { return errors.New("stopped") }}}})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/ready", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("/ready = %d, want 503", rec.Code)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", StatusPath, nil))
	var st Status
	if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
		t.Fatal(err)
	}
	if st.Version != "v1.2.3" || st.Ready || len(st.Checks) != 2 || st.Checks[1].OK || st.CNI.Chained {
		t.Fatalf("status %+v", st)
	}
}
