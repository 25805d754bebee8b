package procs

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

func TestHandler(t *testing.T) {
	g := &Governor{Policy: DefaultPolicy(2)}
	srv := httptest.NewServer(Handler(g))
	defer srv.Close()
	post := func(n string) (int, string) {
		t.Helper()
		resp, err := http.PostForm(srv.URL, url.Values{"n": {n}})
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := post("3"); code != http.StatusOK || g.Pinned() != 3 || !strings.Contains(body, "pinned 3") {
		t.Errorf("n=3: %d %q, pinned %d", code, body, g.Pinned())
	}
	if code, body := post("auto"); code != http.StatusOK || g.Pinned() != 0 || !strings.Contains(body, " auto") {
		t.Errorf("n=auto: %d %q, pinned %d", code, body, g.Pinned())
	}
	for _, bad := range []string{"0", "-2", "x", "", "100000"} {
		if code, _ := post(bad); code != http.StatusBadRequest {
			t.Errorf("n=%q: %d, want 400", bad, code)
		}
	}
	if g.Pinned() != 0 {
		t.Errorf("a refused request changed the pin to %d", g.Pinned())
	}
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodDelete, srv.URL, nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %v %v", resp, err)
	}
	fixed := httptest.NewServer(Handler(nil))
	defer fixed.Close()
	if resp, err := http.PostForm(fixed.URL, url.Values{"n": {"2"}}); err != nil || resp.StatusCode != http.StatusConflict {
		t.Errorf("POST to a fixed scheduler: %v %v", resp, err)
	}
}
