package observe

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/deploy/dashboards"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// prometheusAddr is where the test's Prometheus listens, inside the
// control plane's network namespace (which reaches every node).
const prometheusAddr = "127.0.0.1:19090"

// startPrometheus runs the real Prometheus (Debian's) scraping every
// agent's admin port each second, until the test ends.
func startPrometheus(t *testing.T, c *e2eenv.Cluster) *http.Client {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus not installed (make deps installs it): %v", err)
	}
	dir := t.TempDir()
	var targets []string
	for _, n := range c.State.Nodes {
		targets = append(targets, strconv.Quote(net.JoinHostPort(n.IP, "4191")))
	}
	cfg := fmt.Sprintf("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n- job_name: tunmesh-node\n  static_configs:\n  - targets: [%s]\n", strings.Join(targets, ", "))
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net="+namedns.Path(c.Name+"-cp"), "--", bin,
		"--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+prometheusAddr)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("prometheus log (tail):\n%s", tail(string(b), 2000))
		}
	})
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(c.Name + "-cp")}}
	e2eenv.WaitFor(t, 30*time.Second, "prometheus ready", func() error {
		resp, err := hc.Get("http://" + prometheusAddr + "/-/ready")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
	return hc
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// query runs an instant query and returns its sample values.
func query(hc *http.Client, expr string) ([]float64, error) {
	resp, err := hc.Get("http://" + prometheusAddr + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode %q: %w", b, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("query %s: %s", expr, r.Error)
	}
	var out []float64
	for _, s := range r.Data.Result {
		v, _ := s.Value[1].(string)
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return nil, fmt.Errorf("value %q: %w", v, err)
		}
		out = append(out, f)
	}
	return out, nil
}

// testDashboards: after a short workload (HTTP successes and failures, a
// skipped port, a refused dial), every query of every panel of both
// dashboards returns data (at least one sample that is a number) from a
// real Prometheus scraping the agents.
func testDashboards(t *testing.T, f *fixture) {
	hc := startPrometheus(t, f.c)
	ds, err := dashboards.All()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		for i := 0; i < 3; i++ {
			f.get(t, "/")
			f.get(t, "/status/503")
		}
		f.dialSkipped(t)
		f.dialClosed(t)
		time.Sleep(3 * time.Second)
		var missing []string
		for _, d := range ds {
			for _, p := range d.Panels {
				for _, tg := range p.Targets {
					vals, err := query(hc, tg.Expr)
					if err != nil {
						t.Fatalf("%s / %s: %v", d.Title, p.Title, err)
					}
					ok := false
					for _, v := range vals {
						if !math.IsNaN(v) {
							ok = true
						}
					}
					if !ok {
						missing = append(missing, fmt.Sprintf("%s / %s [%s] (%d samples, all NaN or none)", d.Title, p.Title, tg.RefID, len(vals)))
					}
				}
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline.Add(-5 * time.Second)) {
			t.Fatalf("panels without data:\n%s", strings.Join(missing, "\n"))
		}
	}
}

// dialClosed opens a meshed connection to a port nobody listens on: the
// server's agent refuses the stream (counted as a refusal).
func (f *fixture) dialClosed(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := namedns.DialContext(ctx, f.c.PodNetns(f.client), "tcp", net.JoinHostPort(f.server.Status.PodIP, "8081"))
	if err != nil {
		return // refused at once: fine
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = conn.Write([]byte("x"))
	_, _ = io.ReadAll(conn)
}
