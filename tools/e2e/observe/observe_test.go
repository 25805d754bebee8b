package observe

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tunmesh/tunmesh/node/observeapi"
	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// world is the server pod's HTTP body: it must show in the pod-side
// capture and never on the wire.
const secretBody = "observe-e2e-plaintext-body-7f3a9c"

// fixture: a client pod on node-1, a meshed HTTP server on node-2 (tcp
// readiness probe on 8080, skip-inbound-ports 9090 with an echo there), a
// ServiceAccount allowed to capture/tap/edges in the namespace (viewer)
// and one with no grant (nobody).
type fixture struct {
	c              *e2eenv.Cluster
	ns             string
	client, server *corev1.Pod
	viewer, nobody string // tokens for the agents' audience
	viewerAPIToken string // the viewer's token for the API server (refused by the agents)
}

func setup(t *testing.T) *fixture {
	c := e2eenv.Need(t)
	ctx := context.Background()
	ns := c.Namespace(t, "obs-"+e2eenv.RandomSuffix())
	f := &fixture{c: c, ns: ns}
	mk := func(name, node string, ann map[string]string, ctrs ...corev1.Container) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}, Annotations: ann},
			Spec: corev1.PodSpec{NodeSelector: map[string]string{"kubernetes.io/hostname": node}, Containers: ctrs}}
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s: %v", name, err)
		}
		return p
	}
	mk("client", "node-1", nil, corev1.Container{Name: "main", Image: "tunmesh-workload", Args: []string{"sleep"}})
	mk("server", "node-2", map[string]string{"config.tunmesh.io/skip-inbound-ports": "9090"},
		corev1.Container{Name: "http", Image: "tunmesh-workload", Args: []string{"http", "--listen", ":8080", "--text", secretBody},
			ReadinessProbe: &corev1.Probe{PeriodSeconds: 1, ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}}},
		corev1.Container{Name: "echo", Image: "tunmesh-workload", Args: []string{"echo", "--listen", ":9090"}})
	for _, name := range []string{"client", "server"} {
		e2eenv.WaitFor(t, 90*time.Second, "pod "+name+" ready", func() error {
			p := c.Pod(t, ns, name)
			if p.Status.PodIP == "" || !e2eenv.PodReady(p) {
				return fmt.Errorf("phase %s, not ready", p.Status.Phase)
			}
			if name == "client" {
				f.client = p
			} else {
				f.server = p
			}
			return nil
		})
	}
	// RBAC: viewer may capture, tap and see edges in ns; nobody may not.
	for _, sa := range []string{"viewer", "nobody"} {
		if _, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Client.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "tunmesh-observe"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{"tap.tunmesh.io"}, Resources: []string{"pods/capture", "pods/tap", "pods/edges"}, Verbs: []string{"get"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "viewer-observe"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "tunmesh-observe"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "viewer", Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Tokens for the agents are bound to their audience (kubectl create
	// token SA --audience tunmesh.io/observe); apiToken is the API
	// server's kind, which the agents must refuse.
	token := func(sa string, audiences ...string) string {
		tr, err := c.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token for %s: %v", sa, err)
		}
		return tr.Status.Token
	}
	f.viewer, f.nobody = token("viewer", observeapi.TokenAudience), token("nobody", observeapi.TokenAudience)
	f.viewerAPIToken = token("viewer")
	return f
}

// ctl runs tunmeshctl against the cluster with a token for the agents
// (none: the kubeconfig's admin client certificate), dialing the agents
// from the control plane's namespace. It returns stdout and stderr.
func (f *fixture) ctl(t *testing.T, ctx context.Context, token string, args ...string) (string, string, error) {
	t.Helper()
	if token != "" {
		args = append(args, "--agent-token", token)
	}
	args = append(args, "--netns", f.c.Name+"-cp")
	cmd := exec.CommandContext(ctx, filepath.Join(f.c.BinDir, "tunmeshctl"), args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+f.c.State.Kubeconfig)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// get makes one HTTP request from the client pod to the server pod.
func (f *fixture) get(t *testing.T, path string) string {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: namedns.Dialer(f.c.PodNetns(f.client)), DisableKeepAlives: true}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://" + net.JoinHostPort(f.server.Status.PodIP, "8080") + path)
	if err != nil {
		t.Fatalf("GET from client: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// dialSkipped talks to the server's skipped port (plaintext by design).
func (f *fixture) dialSkipped(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := namedns.DialContext(ctx, f.c.PodNetns(f.client), "tcp", net.JoinHostPort(f.server.Status.PodIP, "9090"))
	if err != nil {
		t.Fatalf("dial the skipped port: %v", err)
	}
	defer conn.Close()
	_, _ = conn.Write([]byte("ping"))
	_ = conn.(*net.TCPConn).CloseWrite()
	_, _ = io.ReadAll(conn)
}

// capture runs tunmeshctl capture while fn runs and returns the file.
func (f *fixture) capture(t *testing.T, side string, fn func()) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), side+".pcapng")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	var stderr string
	go func() {
		var err error
		_, stderr, err = f.ctl(t, ctx, f.viewer, "capture", "-n", f.ns, "server", "--side", side, "--duration", "6s", "-w", file)
		done <- err
	}()
	time.Sleep(2 * time.Second) // the capture is running
	fn()
	if err := <-done; err != nil {
		t.Fatalf("capture --side %s: %v\n%s", side, err, stderr)
	}
	return file
}

func tshark(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("tshark", args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if e, ok := err.(*exec.ExitError); ok {
			ee = e
		}
		t.Fatalf("tshark %v: %v\n%s", args, err, func() []byte {
			if ee != nil {
				return ee.Stderr
			}
			return nil
		}())
	}
	return string(out)
}

func TestObserve(t *testing.T) {
	f := setup(t)

	t.Run("CaptureDeniedWithoutTheRole", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, stderr, err := f.ctl(t, ctx, f.nobody, "capture", "-n", f.ns, "server", "--duration", "2s", "-w", filepath.Join(t.TempDir(), "x.pcapng"))
		if err == nil || !strings.Contains(stderr, "Forbidden") {
			t.Fatalf("capture without the Role: err %v, stderr %q; want Forbidden", err, stderr)
		}
		_, stderr, err = f.ctl(t, ctx, "not-a-token", "edges", "-n", f.ns)
		if err == nil || !strings.Contains(stderr, "Unauthorized") {
			t.Fatalf("edges with a bad token: err %v, stderr %q; want Unauthorized", err, stderr)
		}
		// The viewer's API-server token (granted, but not for the agents'
		// audience) is refused: callers never hand one to a node.
		_, stderr, err = f.ctl(t, ctx, f.viewerAPIToken, "edges", "-n", f.ns)
		if err == nil || !strings.Contains(stderr, "Unauthorized") || !strings.Contains(stderr, "audience") {
			t.Fatalf("edges with an API-server token: err %v, stderr %q; want Unauthorized naming the audience", err, stderr)
		}
	})

	t.Run("CapturePodSidePlaintext", func(t *testing.T) {
		var body string
		file := f.capture(t, "pod", func() { body = f.get(t, "/") })
		if !strings.Contains(body, secretBody) {
			t.Fatalf("GET answered %q", body)
		}
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(raw, []byte(secretBody)) {
			t.Fatalf("pod-side capture (%d bytes) lacks the plaintext body", len(raw))
		}
		out := tshark(t, "-r", file, "-Y", "http.response.code == 200", "-T", "fields", "-e", "frame.interface_name")
		if !strings.Contains(out, "tm0") {
			t.Fatalf("tshark finds no HTTP 200 on tm0:\n%s", out)
		}
		out = tshark(t, "-r", file, "-T", "fields", "-e", "frame.interface_name")
		if !strings.Contains(out, "eth0") {
			t.Logf("no eth0 packet in the window (probes run every second): %q", out)
		}
	})

	t.Run("CaptureStreamsLiveToTshark", func(t *testing.T) {
		// -w - | tshark -r -: the response shows in tshark while the
		// capture still runs (it would end only after 60s).
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		script := fmt.Sprintf("%s capture -n %s server --duration 60s -w - --agent-token %s --netns %s | tshark -l -r - -Y 'http.response.code == 200' -T fields -e http.response.code",
			filepath.Join(f.c.BinDir, "tunmeshctl"), f.ns, f.viewer, f.c.Name+"-cp")
		cmd := exec.CommandContext(ctx, "sh", "-c", script)
		cmd.Env = append(os.Environ(), "KUBECONFIG="+f.c.State.Kubeconfig)
		cmd.Stderr = io.Discard
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		// The shell, tunmeshctl and tshark share a process group, ended
		// together below.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			_ = cmd.Wait()
		}()
		lines := make(chan string, 16)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		start := time.Now()
		time.Sleep(2 * time.Second)
		f.get(t, "/")
		select {
		case l, ok := <-lines:
			if !ok || strings.TrimSpace(l) != "200" {
				t.Fatalf("tshark printed %q (open %v)", l, ok)
			}
			if d := time.Since(start); d > 30*time.Second {
				t.Fatalf("the response reached tshark after %s: not live", d)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("tshark saw no HTTP 200 within 30s of a 60s capture: not streamed live")
		}
	})

	t.Run("CaptureWireSideOnlyTLS", func(t *testing.T) {
		file := f.capture(t, "wire", func() { f.get(t, "/") })
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte(secretBody)) {
			t.Fatal("the plaintext body is on the wire")
		}
		out := tshark(t, "-r", file, "-d", "tcp.port==4143,tls", "-Y", "tls.app_data", "-T", "fields", "-e", "tcp.port")
		if !strings.Contains(out, "4143") {
			t.Fatalf("no TLS application data on the mesh port in the wire capture:\n%s", out)
		}
		if out := tshark(t, "-r", file, "-Y", "!(tcp.port == 4143)"); strings.TrimSpace(out) != "" {
			t.Fatalf("wire capture holds packets off the mesh port:\n%s", out)
		}
	})

	t.Run("Edges", func(t *testing.T) {
		f.get(t, "/")
		f.dialSkipped(t)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var out string
		e2eenv.WaitFor(t, 20*time.Second, "edges", func() error {
			var stderr string
			var err error
			out, stderr, err = f.ctl(t, ctx, f.viewer, "edges", "-n", f.ns, "-o", "wide")
			if err != nil {
				return fmt.Errorf("%v: %s", err, stderr)
			}
			for _, want := range []string{
				fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/default", f.ns),
				"skipped_port", "not_provided_by_remote",
			} {
				if !strings.Contains(out, want) {
					return fmt.Errorf("edges lack %q:\n%s", want, out)
				}
			}
			return nil
		})
		var secured, skipped, probe bool
		for _, l := range strings.Split(out, "\n") {
			fs := strings.Fields(l)
			if len(fs) < 8 {
				continue
			}
			switch {
			case fs[0] == "client" && fs[1] == "server" && fs[4] == "√" && strings.HasSuffix(fs[5], "/sa/default") && strings.HasSuffix(fs[6], "/sa/default"):
				secured = true
			case fs[0] == "client" && fs[1] == "server" && fs[4] == "×" && fs[7] == "skipped_port":
				skipped = true
			case fs[1] == "server" && fs[4] == "×" && fs[7] == "not_provided_by_remote":
				probe = true
			}
		}
		if !secured || !skipped || !probe {
			t.Fatalf("edges -o wide: secured %v skipped %v probe %v:\n%s", secured, skipped, probe, out)
		}
	})

	t.Run("Tap", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var out, stderr string
		done := make(chan error, 1)
		go func() {
			var err error
			out, stderr, err = f.ctl(t, ctx, f.viewer, "tap", "-n", f.ns, "server", "--duration", "6s")
			done <- err
		}()
		time.Sleep(2 * time.Second)
		f.get(t, "/status/503")
		if err := <-done; err != nil {
			t.Fatalf("tap: %v\n%s", err, stderr)
		}
		for _, want := range []string{
			"tcp open id=", "proxy=in", "tls=true client_id=spiffe://cluster.local/ns/" + f.ns + "/sa/default server_id=spiffe://cluster.local/ns/" + f.ns + "/sa/default",
			"req id=", ":method=GET", ":path=/status/503",
			"rsp id=", ":status=503", "latency=",
			"end id=", "response-length=",
			"tcp close id=",
			"tls=not_provided_by_remote",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("tap lacks %q", want)
			}
		}
		if t.Failed() {
			t.Logf("tap output:\n%s", out)
		}
	})

	t.Run("DashboardsQueriesReturnData", func(t *testing.T) { testDashboards(t, f) })

	t.Run("CheckProxy", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// Pod certificates need edges cluster-wide: the admin, by the
		// kubeconfig's client certificate (the agents follow the
		// cluster's client CA; no secret is sent).
		out, stderr, err := f.ctl(t, ctx, "", "check", "--proxy")
		if err != nil {
			t.Fatalf("check --proxy: %v\n%s%s", err, out, stderr)
		}
		for _, want := range []string{"an agent runs and is ready on every node (2 of 2)", "chains tunmesh-cni", "every meshed pod has a current certificate chaining to the trust anchors"} {
			if !strings.Contains(out, want) {
				t.Errorf("check --proxy output lacks %q:\n%s", want, out)
			}
		}
	})
}
