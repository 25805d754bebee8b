package main

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/node/capture"
	"github.com/tunmesh/tunmesh/node/observeapi"
)

func newCaptureCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var (
		af       agentFlags
		side     string
		port     int
		duration time.Duration
		count    int
		maxBytes int64
		filter   string
		out      string
	)
	cmd := &cobra.Command{
		Use:   "capture [-n NS] (POD | deploy/NAME) -w (FILE | -)",
		Short: "Capture a pod's packets on its node, without a sidecar (pcapng)",
		Long: `capture asks the agent of the pod's node for a live packet capture, written as
pcapng to FILE or, with -w -, to standard output (pipe it to tshark -r -).

  --side pod   (default) what the application sees, in plaintext: tm0 (every packet
               between the pod and the mesh, meshed connections before encryption)
               and eth0 (plaintext peers, kubelet probes, replies of passed-through flows)
  --side wire  the mTLS tunnels (TCP on the mesh port) between the pod's node and the
               nodes it talks to: ciphertext only
  --side both  both

The capture ends after --duration (default 30s, at most 10m), -c packets or
--max-bytes (default 64 MiB), or when this command stops. The agent never slows
the pod down for a slow reader: it drops packets and says how many in the file's
interface statistics. Access: get on pods/capture in API group tap.tunmesh.io in
the pod's namespace (docs/observability.md has the Role).`,
		Example: `  tunmeshctl capture -n shop deploy/web -w - | tshark -r - -Y http
  tunmeshctl capture -n shop web-7d9-x2x --side wire --duration 10s -w web-wire.pcapng`,
		Args: cobra.ExactArgs(1),
	}
	cf := kubeFlags(cmd)
	af.add(cmd)
	cmd.Flags().StringVar(&side, "side", "pod", "pod, wire or both")
	cmd.Flags().IntVar(&port, "port", 0, "keep only TCP/UDP packets with this port (0: all)")
	cmd.Flags().DurationVar(&duration, "duration", capture.DefaultDuration, "stop after this long (at most 10m)")
	cmd.Flags().IntVarP(&count, "count", "c", 0, "stop after this many packets (0: no limit)")
	cmd.Flags().Int64Var(&maxBytes, "max-bytes", capture.DefaultMaxBytes, "stop after this many bytes of packets")
	cmd.Flags().StringVar(&filter, "filter", "", "a Wireshark display filter, applied by piping through tshark (no pure-Go BPF compiler is available; see docs/observability.md)")
	cmd.Flags().StringVarP(&out, "write", "w", "", "write pcapng to FILE, or - for standard output (required)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if out == "" {
			return usageError{errors.New("-w FILE or -w - is required")}
		}
		if _, err := capture.ParseSide(side); err != nil {
			return usageError{err}
		}
		if port < 0 || port > 65535 {
			return usageError{fmt.Errorf("--port %d: out of range", port)}
		}
		ctx := cmd.Context()
		ns, err := namespaceOf(cf)
		if err != nil {
			return err
		}
		ag, err := newAgents(cf, af)
		if err != nil {
			return err
		}
		ps, err := resolvePods(ctx, ag.client, ns, args[0])
		if err != nil {
			return err
		}
		p := ps[0]
		if p.Spec.NodeName == "" {
			return fmt.Errorf("pod %s/%s is not scheduled", ns, p.Name)
		}
		_, stderr := writers(cmd)
		if len(ps) > 1 {
			fmt.Fprintf(stderr, "capturing %s/%s (the first of %d pods of %s) on %s\n", ns, p.Name, len(ps), args[0], p.Spec.NodeName)
		}
		q := url.Values{"namespace": {ns}, "pod": {p.Name}, "side": {side}, "duration": {duration.String()},
			"count": {strconv.Itoa(count)}, "maxBytes": {strconv.FormatInt(maxBytes, 10)}}
		if port != 0 {
			q.Set("port", strconv.Itoa(port))
		}
		resp, err := ag.get(ctx, p.Spec.NodeName, observeapi.CapturePath, q)
		if err != nil {
			return err
		}
		defer resp.Body.Close()

		var dst io.Writer = streams.Out
		if out != "-" {
			f, err := os.Create(out)
			if err != nil {
				return fmt.Errorf("create %s: %w", out, err)
			}
			defer f.Close()
			dst = f
		}
		var n int64
		if filter != "" {
			n, err = throughTshark(resp.Body, dst, filter, stderr)
		} else {
			n, err = io.Copy(dst, resp.Body)
		}
		if err != nil && ctx.Err() == nil {
			return fmt.Errorf("capture of %s/%s: %w", ns, p.Name, err)
		}
		fmt.Fprintf(stderr, "captured %d bytes of pcapng from %s/%s on %s (side %s)\n", n, ns, p.Name, p.Spec.NodeName, side)
		return nil
	}
	return cmd
}

// throughTshark filters a pcapng stream with a display filter.
func throughTshark(in io.Reader, out io.Writer, filter string, stderr io.Writer) (int64, error) {
	path, err := exec.LookPath("tshark")
	if err != nil {
		return 0, fmt.Errorf("--filter needs tshark: %w", err)
	}
	cmd := exec.Command(path, "-l", "-r", "-", "-Y", filter, "-F", "pcapng", "-w", "-")
	cmd.Stdin = in
	cw := &countWriter{w: out}
	cmd.Stdout = cw
	cmd.Stderr = stderr
	err = cmd.Run()
	return cw.n, err
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
