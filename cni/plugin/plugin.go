// Package plugin is the tunmesh-cni chained CNI plugin: it hands each pod to
// the tunmesh node agent over the cniapi unix socket and reports the result.
// It creates nothing itself; the agent does all the work in the pod.
//
//   - ADD requires prevResult and the pod's CNI_ARGS, sends an AddRequest with
//     the pod's IPs from prevResult and, if the agent meshed the pod, adds
//     the agent's TUN interface to the result. Nothing answering on the
//     socket fails with ErrTryAgainLater naming the socket, or, with
//     failOpen, passes prevResult through.
//   - DEL is best effort and always succeeds once the config parses: what
//     the mesh puts in a pod dies with its network namespace, and the agent
//     reconciles its own state (GC, restart), so a down or failing agent must
//     not hold up pod teardown. Failures are logged.
//   - CHECK (CNI 0.4.0 and later) requires prevResult and asks the agent.
//   - STATUS (1.1.0 and later) reports ErrPluginNotAvailable while the agent is unreachable or
//     not ready (unless failOpen and unreachable).
//   - GC (1.1.0 and later) forwards the runtime's valid attachments.
//
// Every command answers in the config's cniVersion: a 0.3.x conflist gets a
// 0.3.x result (converted from the current result type).
//
// Logs go to stderr or to the configured logFile, never to stdout, which
// carries the CNI result.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"

	"github.com/tunmesh/tunmesh/cni/cniapi"
)

// About is printed by the plugin when run without CNI_COMMAND.
const About = "tunmesh-cni: chained CNI plugin that hands pods to the tunmesh node agent"

// Plugin implements the CNI commands. The zero value writes to the process's
// stdout and stderr; tests set the writers and call the methods in-process.
type Plugin struct {
	// Stdout receives the CNI result. Nil means os.Stdout.
	Stdout io.Writer
	// Stderr receives logs when the config names no logFile (or it cannot
	// be opened). Nil means os.Stderr.
	Stderr io.Writer
}

// Add implements CNI ADD.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	prev, err := parsePrevResult(conf)
	if err != nil {
		return err
	}
	pod, err := requirePod(args.Args)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "ADD", args, pod)
	defer closeLog()

	client := cniapi.NewClient(conf.Socket, conf.Timeout)
	resp, err := client.Add(context.Background(), cniapi.AddRequest{
		ContainerID:  args.ContainerID,
		Netns:        args.Netns,
		IfName:       args.IfName,
		PodNamespace: pod.Namespace,
		PodName:      pod.Name,
		PodUID:       pod.UID,
		IPs:          podIPs(prev),
	})
	switch {
	case err != nil && conf.FailOpen && errors.Is(err, cniapi.ErrAgentUnavailable):
		log.Warn("tunmesh agent unavailable, failing open: pod is not meshed", "socket", conf.Socket, "err", err)
		return p.print(conf.PrevResult, conf.CNIVersion)
	case err != nil:
		return agentError("add", conf.Socket, err)
	case !resp.Meshed:
		log.Info("pod not meshed", "reason", resp.Reason)
		return p.print(conf.PrevResult, conf.CNIVersion)
	}

	iface := resp.Interface // non-nil when Meshed: checked by the client
	if err := utils.ValidateInterfaceName(iface.Name); err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("tunmesh agent answered an invalid interface name %q", iface.Name), err.Error())
	}
	sandbox := iface.Sandbox
	if sandbox == "" {
		sandbox = args.Netns
	}
	addInterface(prev, iface.Name, sandbox)
	log.Info("pod meshed", "interface", iface.Name)
	return p.print(prev, conf.CNIVersion)
}

// Del implements CNI DEL (best effort, see the package doc).
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	pod, podErr := parsePodArgs(args.Args) // DEL gets what the runtime still knows
	log, closeLog := p.logger(conf, "DEL", args, pod)
	defer closeLog()
	if podErr != nil {
		log.Warn("ignoring unreadable CNI_ARGS", "err", podErr)
	}

	client := cniapi.NewClient(conf.Socket, conf.Timeout)
	err = client.Del(context.Background(), cniapi.DelRequest{
		ContainerID:  args.ContainerID,
		Netns:        args.Netns,
		IfName:       args.IfName,
		PodNamespace: pod.Namespace,
		PodName:      pod.Name,
	})
	switch {
	case err == nil:
		log.Info("pod released")
	case errors.Is(err, cniapi.ErrAgentUnavailable):
		log.Warn("tunmesh agent unavailable; it releases the pod when it reconciles", "socket", conf.Socket, "err", err)
	default:
		log.Warn("tunmesh agent failed to release the pod; not holding up teardown", "socket", conf.Socket, "err", err)
	}
	return nil
}

// Check implements CNI CHECK.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if err := requireVersion(conf, "CHECK", minCheckVersion); err != nil {
		return err
	}
	prev, err := parsePrevResult(conf)
	if err != nil {
		return err
	}
	pod, err := requirePod(args.Args)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "CHECK", args, pod)
	defer closeLog()

	client := cniapi.NewClient(conf.Socket, conf.Timeout)
	err = client.Check(context.Background(), cniapi.CheckRequest{
		ContainerID:  args.ContainerID,
		Netns:        args.Netns,
		IfName:       args.IfName,
		PodNamespace: pod.Namespace,
		PodName:      pod.Name,
		PodUID:       pod.UID,
		IPs:          podIPs(prev),
	})
	if err != nil && conf.FailOpen && errors.Is(err, cniapi.ErrAgentUnavailable) {
		log.Warn("tunmesh agent unavailable, failing open: check skipped", "socket", conf.Socket, "err", err)
		return nil
	}
	if err != nil {
		return agentError("check", conf.Socket, err)
	}
	return nil
}

// Status implements CNI STATUS.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if err := requireVersion(conf, "STATUS", minStatusVersion); err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "STATUS", args, podArgs{})
	defer closeLog()

	client := cniapi.NewClient(conf.Socket, conf.Timeout)
	st, err := client.Status(context.Background())
	switch {
	case err != nil && conf.FailOpen && errors.Is(err, cniapi.ErrAgentUnavailable):
		log.Warn("tunmesh agent unavailable, failing open: reporting ready", "socket", conf.Socket, "err", err)
		return nil
	case err != nil:
		return types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("tunmesh agent on socket %q is not available", conf.Socket), err.Error())
	case !st.Ready:
		return types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("tunmesh agent on socket %q is not ready", conf.Socket), st.Message)
	}
	return nil
}

// GC implements CNI GC.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if err := requireVersion(conf, "GC", minStatusVersion); err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "GC", args, podArgs{})
	defer closeLog()

	req := cniapi.GCRequest{ValidAttachments: make([]cniapi.Attachment, 0, len(conf.ValidAttachments))}
	for _, a := range conf.ValidAttachments {
		req.ValidAttachments = append(req.ValidAttachments, cniapi.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	client := cniapi.NewClient(conf.Socket, conf.Timeout)
	err = client.GC(context.Background(), req)
	if errors.Is(err, cniapi.ErrAgentUnavailable) {
		// The agent garbage-collects by itself when it starts.
		log.Warn("tunmesh agent unavailable; skipping gc", "socket", conf.Socket, "err", err)
		return nil
	}
	if err != nil {
		return agentError("gc", conf.Socket, err)
	}
	return nil
}

// agentError is the one place that turns a cniapi.Client error into the CNI
// error reported to the runtime.
func agentError(op, socket string, err error) *types.Error {
	var (
		apiErr *cniapi.Error
		netErr net.Error
	)
	switch {
	case errors.Is(err, cniapi.ErrAgentUnavailable):
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("tunmesh agent not reachable on socket %q: is tunmesh-node running on this node?", socket), err.Error())
	case errors.As(err, &apiErr):
		return types.NewError(uint(apiErr.Code), fmt.Sprintf("tunmesh agent %s: %s", op, apiErr.Msg), apiErr.Details)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("tunmesh agent on socket %q did not answer %s in time", socket, op), err.Error())
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("tunmesh agent %s on socket %q", op, socket), err.Error())
	}
}

// podIPs returns the pod's addresses from the primary plugin's result: every
// IP not tied to a host-side interface (one without a sandbox).
func podIPs(res *types100.Result) []netip.Prefix {
	var out []netip.Prefix
	for _, ipc := range res.IPs {
		if ipc == nil {
			continue
		}
		if i := ipc.Interface; i != nil && *i >= 0 && *i < len(res.Interfaces) &&
			res.Interfaces[*i] != nil && res.Interfaces[*i].Sandbox == "" {
			continue
		}
		addr, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		ones, bits := ipc.Address.Mask.Size()
		if bits == 0 { // non-canonical mask: keep the address alone
			ones = addr.BitLen()
		} else if addr.Is4() && bits == 128 {
			ones -= 96
		}
		pfx := netip.PrefixFrom(addr, ones)
		if pfx.IsValid() {
			out = append(out, pfx)
		}
	}
	return out
}

// addInterface appends the agent's interface to res unless a repeated ADD
// already put it there. No IP references it: the TUN carries no address of
// its own.
func addInterface(res *types100.Result, name, sandbox string) {
	for _, i := range res.Interfaces {
		if i != nil && i.Name == name && i.Sandbox == sandbox {
			return
		}
	}
	res.Interfaces = append(res.Interfaces, &types100.Interface{Name: name, Sandbox: sandbox})
}

// print writes r to stdout in the config's CNI version.
func (p *Plugin) print(r types.Result, cniVersion string) error {
	out, err := r.GetAsVersion(cniVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("convert result to %q: %v", cniVersion, err), "")
	}
	w := p.Stdout
	if w == nil {
		w = os.Stdout
	}
	if err := out.PrintTo(w); err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("write result: %v", err), "")
	}
	return nil
}

// logger returns the command's logger, writing to conf.LogFile if set (falling
// back to stderr if it cannot be opened), and a func that closes the file.
func (p *Plugin) logger(conf *Config, cmd string, args *skel.CmdArgs, pod podArgs) (*slog.Logger, func()) {
	var w io.Writer = p.Stderr
	if w == nil {
		w = os.Stderr
	}
	closeFn := func() {}
	var openErr error
	if conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if errors.Is(err, os.ErrNotExist) {
			if err = os.MkdirAll(filepath.Dir(conf.LogFile), 0o755); err == nil {
				f, err = os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
			}
		}
		if err == nil {
			w, closeFn = f, func() { f.Close() }
		} else {
			openErr = err
		}
	}
	log := slog.New(slog.NewTextHandler(w, nil)).With("component", "tunmesh-cni", "cmd", cmd)
	if args.ContainerID != "" {
		log = log.With("container_id", args.ContainerID)
	}
	if pod.Name != "" {
		log = log.With("pod_namespace", pod.Namespace, "pod", pod.Name)
	}
	if openErr != nil {
		log.Warn("cannot open log file, logging to stderr", "log_file", conf.LogFile, "err", openErr)
	}
	return log, closeFn
}
