package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

func newTapCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var (
		af       agentFlags
		to       string
		method   string
		path     string
		output   string
		duration time.Duration
	)
	cmd := &cobra.Command{
		Use:   "tap [-n NS] (POD | deploy/NAME | ns/NAME) [--to RESOURCE] [--method M] [--path P] [-o json]",
		Short: "Stream a workload's connections and HTTP/1 requests live",
		Long: `tap streams, one line per event, what the node agents see of a resource's
connections, in the seed's shape:

  tcp open id=… proxy=out src=… dst=… tls=true client_id=… server_id=…
  req id=… proxy=out src=… dst=… tls=true :method=GET :authority=… :path=/
  rsp id=… proxy=out src=… dst=… tls=true :status=200 latency=…µs
  end id=… proxy=out src=… dst=… tls=true duration=…µs response-length=…B
  tcp close id=…

proxy=out: the resource's pod is the client; proxy=in: the server. Plaintext
connections into a meshed pod (kubelet probes) show tls=not_provided_by_remote;
connections the mesh did not carry show why (tls=skipped_port, not_meshed, ...).
HTTP/1 is shown inside meshed connections only. Runs until interrupted or
--duration. Access: get on pods/tap in API group tap.tunmesh.io in the namespace.`,
		Example: `  tunmeshctl tap -n shop deploy/web
  tunmeshctl tap -n shop deploy/web --to deploy/db --method GET --path /api -o json`,
		Args: cobra.ExactArgs(1),
	}
	cf := kubeFlags(cmd)
	af.add(cmd)
	cmd.Flags().StringVar(&to, "to", "", "only connections whose other end is this resource (POD or deploy/NAME, same namespace)")
	cmd.Flags().StringVar(&method, "method", "", "only HTTP requests with this method")
	cmd.Flags().StringVar(&path, "path", "", "only HTTP requests whose path starts with this")
	cmd.Flags().StringVarP(&output, "output", "o", "", "json: one JSON event per line")
	cmd.Flags().DurationVar(&duration, "duration", 0, "stop after this long (0: until interrupted)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if output != "" && output != "json" {
			return usageError{fmt.Errorf("-o %q: want json", output)}
		}
		ctx := cmd.Context()
		if duration > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, duration)
			defer cancel()
		}
		ns, err := namespaceOf(cf)
		if err != nil {
			return err
		}
		ag, err := newAgents(cf, af)
		if err != nil {
			return err
		}
		// What to tap: one pod, a workload's pods, or a namespace. Pods
		// are tapped one stream each (pod=): the agent sends only their
		// events, and a grant on those pods is enough.
		var names map[string]bool // nil: the whole namespace
		var taps []tapStream
		if k, n, ok := strings.Cut(args[0], "/"); ok && (k == "ns" || k == "namespace") {
			ns = n
			nodes, err := ag.nodes(ctx)
			if err != nil {
				return err
			}
			taps = tapStreams(ns, nil, nodes)
		} else {
			ps, err := resolvePods(ctx, ag.client, ns, args[0])
			if err != nil {
				return err
			}
			names = map[string]bool{}
			for _, p := range ps {
				names[p.Name] = true
			}
			taps = tapStreams(ns, ps, nil)
		}
		var toNames map[string]bool
		if to != "" {
			ps, err := resolvePods(ctx, ag.client, ns, to)
			if err != nil {
				return err
			}
			toNames = map[string]bool{}
			for _, p := range ps {
				toNames[p.Name] = true
			}
		}
		f := tapFilter{ns: ns, names: names, to: toNames, method: method, path: path, reqs: map[string]flowlog.Event{}}

		events := make(chan taggedEvent, 256)
		errs := make(chan error, len(taps))
		var wg sync.WaitGroup
		for _, ts := range taps {
			n := ts.node
			resp, err := ag.get(ctx, n, observeapi.TapPath, ts.query)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			wg.Add(1)
			go func() { // RoutineTapNode: ends when the stream does (ctx cancels the request)
				defer wg.Done()
				defer resp.Body.Close()
				sc := bufio.NewScanner(resp.Body)
				sc.Buffer(make([]byte, 64<<10), 1<<20)
				for sc.Scan() {
					if len(strings.TrimSpace(sc.Text())) == 0 {
						continue
					}
					var e flowlog.Event
					if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
						errs <- fmt.Errorf("tap from %s: %w", n, err)
						return
					}
					select {
					case events <- taggedEvent{Event: e, Node: n, pod: ts.pod}:
					case <-ctx.Done():
						return
					}
				}
				if err := sc.Err(); err != nil && ctx.Err() == nil {
					errs <- fmt.Errorf("tap from %s: %w", n, err)
				}
			}()
		}
		go func() { wg.Wait(); close(events) }()
		enc := json.NewEncoder(streams.Out)
		for e := range events {
			if !f.keepFrom(e) {
				continue
			}
			if output == "json" {
				_ = enc.Encode(e)
				continue
			}
			if e.Type == "dropped" {
				fmt.Fprintf(streams.Out, "# %d events dropped by the agent on %s (reader too slow)\n", e.ResponseLength, e.Node)
				continue
			}
			fmt.Fprintln(streams.Out, e.String())
		}
		select {
		case err := <-errs:
			return err
		default:
		}
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) && cmd.Context().Err() == nil {
			return ctx.Err()
		}
		return nil
	}
	return cmd
}

// taggedEvent is an event and the node whose agent saw it (and the pod
// whose stream brought it, "" for a namespace's).
type taggedEvent struct {
	flowlog.Event
	Node string `json:"node"`
	pod  string
}

// tapStream is one tap request: a pod on its node, or a namespace on a
// node.
type tapStream struct {
	node, pod string
	query     url.Values
}

// tapStreams are the requests of a tap: one per pod (pods not yet
// scheduled are skipped), or, for a whole namespace, one per node.
func tapStreams(ns string, pods []corev1.Pod, nodes []string) []tapStream {
	var out []tapStream
	if pods == nil {
		for _, n := range nodes {
			out = append(out, tapStream{node: n, query: url.Values{"namespace": {ns}}})
		}
		return out
	}
	for _, p := range pods {
		if p.Spec.NodeName == "" {
			continue
		}
		out = append(out, tapStream{node: p.Spec.NodeName, pod: p.Name, query: url.Values{"namespace": {ns}, "pod": {p.Name}}})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].node+"/"+out[i].pod < out[j].node+"/"+out[j].pod })
	return out
}

// tapFilter selects the events tap prints.
type tapFilter struct {
	ns           string
	names, to    map[string]bool // nil: any
	method, path string
	reqs         map[string]flowlog.Event // node/id -> the request of an open exchange (end lines)
}

// keepFrom is keep for an event of a pod's stream: only that pod's own
// (two tapped pods on one node both get their connection's events).
func (f tapFilter) keepFrom(e taggedEvent) bool {
	if e.pod != "" && e.Type != "dropped" {
		local := e.Conn.SrcPod
		if e.Conn.Proxy == flowlog.In {
			local = e.Conn.DstPod
		}
		if local.Name != e.pod {
			return false
		}
	}
	return f.keep(e.Event)
}

func (f tapFilter) keep(e flowlog.Event) bool {
	if e.Type == "dropped" {
		return true
	}
	c := e.Conn
	local, other := c.SrcPod, c.DstPod
	if c.Proxy == flowlog.In {
		local, other = c.DstPod, c.SrcPod
	}
	if local.Namespace != f.ns || f.names != nil && !f.names[local.Name] {
		return false
	}
	if f.to != nil && (other.Namespace != f.ns || !f.to[other.Name]) {
		return false
	}
	if f.method == "" && f.path == "" {
		return true
	}
	key := fmt.Sprintf("%s/%d", c.Dst, c.ID)
	switch e.Type {
	case "req", "rsp":
		ok := (f.method == "" || e.Method == f.method) && strings.HasPrefix(e.Path, f.path)
		if e.Type == "rsp" {
			if ok {
				f.reqs[key] = e
			} else {
				delete(f.reqs, key)
			}
		}
		return ok
	case "end":
		_, ok := f.reqs[key]
		delete(f.reqs, key)
		return ok
	}
	return false // tcp lines are not requests
}
