package policy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// The upstream model (test/e2e/network/netpol): namespaces x, y, z (here
// with a random suffix, labelled ns=<x|y|z>), pods a, b, c in each
// (labelled pod=<name>), each serving TCP 80 and 81 (container ports
// serve-80-tcp, serve-81-tcp). plain/p is a pod of a namespace the mesh
// does not claim: a plaintext client.
var (
	modelNS   = []string{"x", "y", "z"}
	modelPods = []string{"a", "b", "c"}
)

type podRef struct{ ns, name string } // model names: ns is x, y, z or p

func (p podRef) String() string { return p.ns + "/" + p.name }

type model struct {
	c      *e2eenv.Cluster
	suffix string
	pods   map[podRef]*corev1.Pod
	plain  podRef
}

func (m *model) ns(short string) string { return short + "-" + m.suffix }

func allModelPods() []podRef {
	var out []podRef
	for _, ns := range modelNS {
		for _, p := range modelPods {
			out = append(out, podRef{ns, p})
		}
	}
	return out
}

// newModel creates the namespaces and pods (spread over the nodes), the
// servers inside them, and removes everything afterwards.
func newModel(t *testing.T, c *e2eenv.Cluster) *model {
	t.Helper()
	m := &model{c: c, suffix: e2eenv.RandomSuffix(), pods: map[podRef]*corev1.Pod{}, plain: podRef{"p", "plain"}}
	ctx := context.Background()
	nodes := c.State.Nodes
	i := 0
	create := func(ns string, ann map[string]string) {
		name := m.ns(ns)
		_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: name, Labels: map[string]string{"ns": ns}, Annotations: ann}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create namespace %s: %v", name, err)
		}
		t.Cleanup(func() { _ = c.Client.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{}) })
		e2eenv.WaitFor(t, 30*time.Second, "default service account in "+name, func() error {
			_, err := c.Client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
			return err
		})
	}
	for _, ns := range modelNS {
		create(ns, nil)
	}
	create("p", map[string]string{"tunmesh.io/inject": "disabled"})
	// y/a runs as ServiceAccount "friend" (the authorization test).
	if _, err := c.Client.CoreV1().ServiceAccounts(m.ns("y")).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "friend"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	refs := append(allModelPods(), m.plain)
	for _, r := range refs {
		ctr := corev1.Container{Name: "main", Image: "tunmesh-workload", Args: []string{"sleep"}}
		for _, port := range []int32{80, 81} {
			ctr.Ports = append(ctr.Ports, corev1.ContainerPort{Name: fmt.Sprintf("serve-%d-tcp", port), ContainerPort: port, Protocol: corev1.ProtocolTCP})
		}
		if r == (podRef{"x", "b"}) {
			// Kubelet probes must keep working under all-authenticated.
			ctr.ReadinessProbe = &corev1.Probe{PeriodSeconds: 1, FailureThreshold: 1,
				ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(80)}}}
		}
		sa := ""
		if r == (podRef{"y", "a"}) {
			sa = "friend"
		}
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: r.name, Labels: map[string]string{"pod": r.name}},
			Spec: corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{ctr},
				NodeSelector: map[string]string{"kubernetes.io/hostname": nodes[i%len(nodes)].Name}},
		}
		i++
		if _, err := c.Client.CoreV1().Pods(m.ns(r.ns)).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s: %v", r, err)
		}
	}
	for _, r := range refs {
		e2eenv.WaitFor(t, 90*time.Second, "pod "+r.String()+" running", func() error {
			p := c.Pod(t, m.ns(r.ns), r.name)
			if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				return fmt.Errorf("phase %s", p.Status.Phase)
			}
			m.pods[r] = p
			return nil
		})
		for _, port := range []int{80, 81} {
			serveOK(t, c, m.pods[r], port)
		}
	}
	return m
}

// serveOK accepts on port inside pod and answers every connection with
// one byte, then closes it.
func serveOK(t *testing.T, c *e2eenv.Cluster, pod *corev1.Pod, port int) {
	t.Helper()
	ln, err := namedns.Listen(c.PodNetns(pod), "tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // RoutineServe: ends when the listener closes (cleanup)
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte{'k'})
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}

const probeTimeout = 3 * time.Second

// Outcomes of a probe. Every denial the agents enforce drops (the source
// agent drops the SYN, or the server's agent its SYN-ACK to a plaintext
// client), so the client times out; a reset or any other error is not a
// policy denial (a missing server, a refusal of the mesh) and never
// counts as one.
const (
	outcomeOK      = "ok"
	outcomeTimeout = "timeout"
	outcomeReset   = "reset"
)

// probe tells how from's connection to to:port ends: outcomeOK (the
// connection opens and the server's byte arrives), outcomeTimeout,
// outcomeReset (refused or reset), or the error.
func (m *model) probe(from, to podRef, port int) string {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	dst := net.JoinHostPort(m.pods[to].Status.PodIP, fmt.Sprint(port))
	conn, err := namedns.DialContext(ctx, m.c.PodNetns(m.pods[from]), "tcp", dst)
	if err != nil {
		return classify(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(probeTimeout))
	b := make([]byte, 1)
	n, err := conn.Read(b)
	switch {
	case err != nil:
		return classify(err)
	case n != 1 || b[0] != 'k':
		return fmt.Sprintf("read %q", b[:n])
	}
	return outcomeOK
}

func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return outcomeTimeout
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF):
		return outcomeReset
	}
	return "error: " + err.Error()
}

// outcome is what a probe must observe for an expected reachability.
func outcome(allowed bool) string {
	if allowed {
		return outcomeOK
	}
	return outcomeTimeout
}

// reach is an expected reachability: from -> to -> allowed.
type reach map[podRef]map[podRef]bool

// Self-connections are left out: a pod dialing its own IP never leaves its
// network namespace (the kernel's local route), so no agent sees it
// (docs/policy.md).
func newReach(def bool, from, to []podRef) reach {
	r := reach{}
	for _, f := range from {
		r[f] = map[podRef]bool{}
		for _, t := range to {
			if f != t {
				r[f][t] = def
			}
		}
	}
	return r
}

// expectPeer sets every pair whose ends match; "" matches any.
func (r reach) expectPeer(fromNS, fromPod, toNS, toPod string, v bool) {
	match := func(p podRef, ns, name string) bool {
		return (ns == "" || p.ns == ns) && (name == "" || p.name == name)
	}
	for f := range r {
		for t := range r[f] { // only pairs present: self-connections stay out
			if match(f, fromNS, fromPod) && match(t, toNS, toPod) {
				r[f][t] = v
			}
		}
	}
}

func (r reach) expectAllIngress(to podRef, v bool) {
	for f := range r {
		if _, ok := r[f][to]; ok {
			r[f][to] = v
		}
	}
}

// check probes every pair of want in parallel until the observed matrix
// equals want or the timeout passes (policy changes reach the agents
// through their informers), and fails with both matrices otherwise.
func (m *model) check(t *testing.T, port int, want reach, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := reach{}
		kinds := map[podRef]map[podRef]string{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for f, row := range want {
			got[f] = map[podRef]bool{}
			kinds[f] = map[podRef]string{}
			for to := range row {
				wg.Add(1)
				go func() {
					defer wg.Done()
					o := m.probe(f, to, port)
					mu.Lock()
					got[f][to] = o == outcomeOK
					kinds[f][to] = o
					mu.Unlock()
				}()
			}
		}
		wg.Wait()
		var wrong []string
		for f, row := range want {
			for to, v := range row {
				if kinds[f][to] != outcome(v) {
					wrong = append(wrong, fmt.Sprintf("%s -> %s:%d %s, want %s", f, to, port, kinds[f][to], outcome(v)))
				}
			}
		}
		if len(wrong) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("port %d: %d of the reachability matrix wrong:\n%s\nwant:\n%s\ngot:\n%s", port, len(wrong), strings.Join(wrong, "\n"), want, got)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (r reach) String() string {
	var froms, tos []podRef
	for f := range r {
		froms = append(froms, f)
		for t := range r[f] {
			tos = append(tos, t)
		}
	}
	sortRefs(froms)
	tos = uniq(tos)
	var b strings.Builder
	b.WriteString("       ")
	for _, t := range tos {
		b.WriteString(t.String() + " ")
	}
	b.WriteString("\n")
	for _, f := range froms {
		b.WriteString(f.String() + "    ")
		for _, t := range tos {
			switch v, ok := r[f][t]; {
			case !ok:
				b.WriteString("-   ")
			case v:
				b.WriteString(".   ")
			default:
				b.WriteString("X   ")
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func sortRefs(s []podRef) {
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j].String() < s[i].String() {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
}

func uniq(s []podRef) []podRef {
	sortRefs(s)
	var out []podRef
	for i, p := range s {
		if i == 0 || p != s[i-1] {
			out = append(out, p)
		}
	}
	return out
}

// apply creates the policies (in the model's namespaces: each policy's
// Namespace is a model name, x, y or z) and returns a func that deletes
// them.
func (m *model) apply(t *testing.T, nps ...*networkingv1.NetworkPolicy) func() {
	t.Helper()
	ctx := context.Background()
	for _, np := range nps {
		np = np.DeepCopy()
		np.Namespace = m.ns(np.Namespace)
		if _, err := m.c.Client.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create network policy %s/%s: %v", np.Namespace, np.Name, err)
		}
	}
	return func() {
		for _, np := range nps {
			_ = m.c.Client.NetworkingV1().NetworkPolicies(m.ns(np.Namespace)).Delete(ctx, np.Name, metav1.DeleteOptions{})
		}
	}
}

// applyYAML kubectl-applies a manifest (with NS(x) etc. replaced by the
// model's namespace names) and returns a func that deletes it.
func (m *model) applyYAML(t *testing.T, manifest string) func() {
	t.Helper()
	for _, ns := range append(modelNS, "p") {
		manifest = strings.ReplaceAll(manifest, "NS("+ns+")", m.ns(ns))
	}
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	m.c.Kubectl(t, "apply", "-f", f)
	return func() { _, _ = m.c.KubectlErr("delete", "--ignore-not-found", "-f", f) }
}

// agentMetric sums a series (label sets containing filter) over the
// agents of every node.
func agentMetric(t *testing.T, c *e2eenv.Cluster, name, filter string) float64 {
	t.Helper()
	var sum float64
	for _, n := range c.State.Nodes {
		out, err := inNetnsGet(n.Netns, "http://"+n.IP+":4191/metrics")
		if err != nil {
			t.Fatalf("metrics of %s: %v", n.Name, err)
		}
		for _, line := range strings.Split(out, "\n") {
			if !strings.HasPrefix(line, name) || !strings.Contains(line, filter) {
				continue
			}
			var v float64
			f := strings.Fields(line)
			_, _ = fmt.Sscan(f[len(f)-1], &v)
			sum += v
		}
	}
	return sum
}

// inNetnsGet fetches url from inside a network namespace.
func inNetnsGet(netns, url string) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(netns)}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
