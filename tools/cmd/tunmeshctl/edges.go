package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/node/flowlog"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

// edgeRow is one line of edges.
type edgeRow struct {
	Src      string `json:"src"`
	Dst      string `json:"dst"`
	SrcNS    string `json:"srcNamespace"`
	DstNS    string `json:"dstNamespace"`
	Secured  bool   `json:"secured"`
	ClientID string `json:"clientId,omitempty"`
	ServerID string `json:"serverId,omitempty"`
	Msg      string `json:"msg,omitempty"`
	Conns    int    `json:"connections"`
}

func newEdgesCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var (
		af     agentFlags
		all    bool
		output string
	)
	cmd := &cobra.Command{
		Use:   "edges [-n NS | -A] [pod | deploy | ns]",
		Short: "Show which pods talk to which, and whether the mesh secures it",
		Long: `edges lists the connections the node agents account for (open now, or seen in
the last 5 minutes), one row per source, destination and state. SECURED means
mTLS between the two pods' identities; otherwise MSG says why not:

  not_meshed              the destination is not in the mesh (or the source opted out)
  skipped_port            a skip-inbound/outbound-ports annotation covers the port
  not_provided_by_remote  a plaintext connection reached a meshed pod from outside the
                          mesh (kubelet probes, unmeshed peers)
  no_certificate, ...     the mesh claimed the connection but refused it (fail closed)

Rows are pods (default), workloads (deploy) or namespaces (ns). -o wide adds the client and
server identities and MSG; -o json prints everything. Access: get on
pods/edges in API group tap.tunmesh.io in the namespace (cluster-wide for -A).`,
		Args: cobra.MaximumNArgs(1),
	}
	cf := kubeFlags(cmd)
	af.add(cmd)
	cmd.Flags().BoolVarP(&all, "all-namespaces", "A", false, "every namespace")
	cmd.Flags().StringVarP(&output, "output", "o", "", "wide or json")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		by := byPod
		if len(args) == 1 {
			switch args[0] {
			case "pod", "pods", "po":
			case "deploy", "deployment", "deployments", "workload":
				by = byWorkload
			case "ns", "namespace", "namespaces":
				by = byNamespace
			default:
				return usageError{fmt.Errorf("edges of %q: want pod, deploy or ns", args[0])}
			}
		}
		if output != "" && output != "wide" && output != "json" {
			return usageError{fmt.Errorf("-o %q: want wide or json", output)}
		}
		ctx := cmd.Context()
		ns := ""
		if !all {
			var err error
			if ns, err = namespaceOf(cf); err != nil {
				return err
			}
		}
		ag, err := newAgents(cf, af)
		if err != nil {
			return err
		}
		nodes, err := ag.nodes(ctx)
		if err != nil {
			return err
		}
		var edges []flowlog.Edge
		_, stderr := writers(cmd)
		for _, n := range nodes {
			resp, err := ag.get(ctx, n, observeapi.EdgesPath, url.Values{"namespace": {ns}})
			if err != nil {
				if errors.Is(err, errForbidden) {
					return err
				}
				fmt.Fprintf(stderr, "warning: %v\n", err)
				continue
			}
			var es []flowlog.Edge
			err = json.NewDecoder(resp.Body).Decode(&es)
			resp.Body.Close()
			if err != nil {
				return fmt.Errorf("edges from %s: %w", n, err)
			}
			edges = append(edges, es...)
		}
		rows := edgeRows(edges, by)
		return printEdges(streams.Out, rows, output)
	}
	return cmd
}

// grouping is what a row of edges stands for.
type grouping int

const (
	byPod grouping = iota
	byWorkload
	byNamespace
)

// edgeRows merges the agents' edges into rows. A plaintext connection
// between two pods is seen by both agents (the client's says why it was
// not meshed, the server's only that it came in plaintext): the client's
// reason wins.
func edgeRows(edges []flowlog.Edge, by grouping) []edgeRow {
	name := func(p flowlog.PodRef, addr string) string {
		switch {
		case p.Name == "":
			return addr
		case by == byNamespace:
			return p.Namespace
		case by == byWorkload && p.Workload != "":
			return p.Workload
		}
		return p.Name
	}
	outPlain := map[[2]string]bool{}
	for _, e := range edges {
		if e.Proxy == flowlog.Out && e.TLS != flowlog.TLSTrue {
			outPlain[[2]string{e.Src.Namespace + "/" + e.Src.Name, e.Dst.Namespace + "/" + e.Dst.Name}] = true
		}
	}
	m := map[edgeRow]int{}
	for _, e := range edges {
		if e.Proxy == flowlog.In && e.TLS == flowlog.NotProvidedByRemote && e.Src.Name != "" &&
			outPlain[[2]string{e.Src.Namespace + "/" + e.Src.Name, e.Dst.Namespace + "/" + e.Dst.Name}] {
			continue
		}
		r := edgeRow{Src: name(e.Src, e.SrcAddr), Dst: name(e.Dst, e.DstAddr), SrcNS: e.Src.Namespace, DstNS: e.Dst.Namespace,
			Secured: e.TLS == flowlog.TLSTrue, ClientID: e.ClientID, ServerID: e.ServerID}
		if !r.Secured {
			r.Msg = e.TLS
		}
		m[r] += e.Conns
	}
	rows := make([]edgeRow, 0, len(m))
	for r, n := range m {
		r.Conns = n
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		return strings.Join([]string{a.SrcNS, a.Src, a.DstNS, a.Dst, a.Msg}, "\x00") < strings.Join([]string{b.SrcNS, b.Src, b.DstNS, b.Dst, b.Msg}, "\x00")
	})
	return rows
}

func printEdges(w io.Writer, rows []edgeRow, output string) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	if output == "wide" {
		fmt.Fprintln(tw, "SRC\tDST\tSRC_NS\tDST_NS\tSECURED\tCLIENT_ID\tSERVER_ID\tMSG")
	} else {
		fmt.Fprintln(tw, "SRC\tDST\tSRC_NS\tDST_NS\tSECURED")
	}
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, r := range rows {
		sec := "√"
		if !r.Secured {
			sec = "×"
		}
		if output == "wide" {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Src, r.Dst, dash(r.SrcNS), dash(r.DstNS), sec, dash(r.ClientID), dash(r.ServerID), dash(r.Msg))
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Src, r.Dst, dash(r.SrcNS), dash(r.DstNS), sec)
		}
	}
	return tw.Flush()
}
