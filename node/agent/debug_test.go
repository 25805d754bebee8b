package agent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestCheckDebugAddr(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:6060": true,
		"[::1]:6060":     true,
		"0.0.0.0:6060":   false,
		":6060":          false,
		"10.0.0.1:6060":  false,
		"localhost:6060": false, // a name could resolve anywhere
		"127.0.0.1":      false,
		"127.0.0.1:":     false,
	} {
		if err := checkDebugAddr(addr); (err == nil) != ok {
			t.Errorf("checkDebugAddr(%q) = %v, want ok %v", addr, err, ok)
		}
	}
}

func TestDebugHandlerServesProfiles(t *testing.T) {
	srv := httptest.NewServer(debugHandler(nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "goroutine profile") {
		t.Fatalf("goroutine profile: %s %q", resp.Status, body[:min(len(body), 200)])
	}
}
