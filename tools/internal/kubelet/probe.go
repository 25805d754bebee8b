package kubelet

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

type probeKind string

const (
	readiness probeKind = "Readiness"
	liveness  probeKind = "Liveness"
)

// prober runs one probe of one container run. Network probes dial from the
// node's namespace, as a kubelet does, so their traffic reaches the pod the
// way real probe traffic does; exec probes run inside the pod's namespace.
type prober struct {
	kind      probeKind
	probe     *corev1.Probe
	container corev1.Container
	nodeNetns string
	podNetns  string
	podIP     netip.Addr
}

// run probes until ctx ends and calls report on every change of result
// (after the success/failure thresholds). Liveness starts healthy, readiness
// starts not ready, as in a kubelet.
func (p *prober) run(ctx context.Context, report func(ok bool, msg string)) {
	pr := p.probe
	period := seconds(pr.PeriodSeconds, 10)
	succThr := int(max(pr.SuccessThreshold, 1))
	failThr := int(max(pr.FailureThreshold, 3))
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(pr.InitialDelaySeconds) * time.Second):
	}
	var succ, fail int
	result := p.kind == liveness // liveness starts healthy; readiness starts not ready
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		err := p.once(ctx)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			succ, fail = succ+1, 0
			if !result && succ >= succThr {
				result = true
				report(true, "")
			}
		} else {
			succ, fail = 0, fail+1
			if result && fail >= failThr {
				result = false
				report(false, err.Error())
				if p.kind == liveness {
					return // the container is restarted; its next run gets a new prober
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func seconds(v, def int32) time.Duration {
	if v <= 0 {
		v = def
	}
	return time.Duration(v) * time.Second
}

// once runs the probe one time; nil means success.
func (p *prober) once(ctx context.Context) error {
	timeout := seconds(p.probe.TimeoutSeconds, 1)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	h := p.probe.ProbeHandler
	switch {
	case h.Exec != nil:
		return p.exec(ctx, h.Exec.Command)
	case h.HTTPGet != nil:
		return p.httpGet(ctx, h.HTTPGet)
	case h.TCPSocket != nil:
		port, err := p.port(h.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := h.TCPSocket.Host
		if host == "" {
			host = p.podIP.String()
		}
		c, err := namedns.DialContext(ctx, p.nodeNetns, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return c.Close()
	default:
		return fmt.Errorf("probe handler not supported by the kubelet stand-in (exec, httpGet and tcpSocket are)")
	}
}

func (p *prober) exec(ctx context.Context, argv []string) error {
	if len(argv) == 0 {
		return fmt.Errorf("exec probe: empty command")
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + namedns.Path(p.podNetns), "--"}, argv...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("exec probe %q: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (p *prober) httpGet(ctx context.Context, g *corev1.HTTPGetAction) error {
	port, err := p.port(g.Port)
	if err != nil {
		return err
	}
	host := g.Host
	if host == "" {
		host = p.podIP.String()
	}
	scheme := strings.ToLower(string(g.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
	if err != nil {
		return fmt.Errorf("http probe: %w", err)
	}
	req.Header.Set("User-Agent", "kube-probe/tunmesh-standin")
	for _, hd := range g.HTTPHeaders {
		req.Header.Add(hd.Name, hd.Value)
	}
	tr := &http.Transport{
		// Like the kubelet: probes do not verify serving certificates.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // probe semantics
		DisableKeepAlives: true,
		DialContext:       namedns.Dialer(p.nodeNetns),
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return fmt.Errorf("http probe: %w", err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("http probe: status %d", resp.StatusCode)
	}
	return nil
}

// port resolves a numeric or named container port.
func (p *prober) port(v intstr.IntOrString) (int, error) {
	if v.Type == intstr.Int {
		return v.IntValue(), nil
	}
	for _, cp := range p.container.Ports {
		if cp.Name == v.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("probe port %q: no such named port in container %q", v.StrVal, p.container.Name)
}
