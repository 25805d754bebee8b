package e2eenv

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// agentGet GETs path from the admin port (:4191) of node's agent, from
// inside the node's namespace.
func (c *Cluster) agentGet(node, path string, timeout time.Duration) (*http.Response, func(), error) {
	for _, n := range c.State.Nodes {
		if n.Name != node {
			continue
		}
		client := &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: namedns.Dialer(n.Netns)}}
		resp, err := client.Get("http://" + n.IP + ":4191" + path)
		if err != nil {
			client.CloseIdleConnections()
			return nil, nil, err
		}
		return resp, func() { resp.Body.Close(); client.CloseIdleConnections() }, nil
	}
	return nil, nil, fmt.Errorf("no node %s in cluster %s", node, c.Name)
}

// AgentMetric sums the samples of the series name of node's agent whose
// line contains filter (a label such as `reason="x"`, or "" for all).
func (c *Cluster) AgentMetric(node, name, filter string) (float64, error) {
	resp, done, err := c.agentGet(node, "/metrics", 5*time.Second)
	if err != nil {
		return 0, fmt.Errorf("metrics of %s: %w", node, err)
	}
	defer done()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || !strings.Contains(line, filter) {
			continue
		}
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		sum += v
	}
	return sum, sc.Err()
}

// AgentReady is nil when node's agent answers /ready with 200.
func (c *Cluster) AgentReady(node string) error {
	resp, done, err := c.agentGet(node, "/ready", time.Second)
	if err != nil {
		return err
	}
	defer done()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("ready: %s %s", resp.Status, b)
	}
	return nil
}

// AgentPID finds the agent process of node in this cluster (0: none).
func (c *Cluster) AgentPID(node string) int {
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "tunmesh-node" || !strings.Contains(string(b), "/"+c.Name+"/") {
			continue
		}
		for i, a := range args {
			if a == "--node-name" && i+1 < len(args) && args[i+1] == node {
				return pid
			}
		}
	}
	return 0
}
