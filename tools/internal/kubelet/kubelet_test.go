package kubelet

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func validConfig(t *testing.T) Config {
	dir := t.TempDir()
	return Config{
		NodeName:       "tmtest-node",
		Netns:          "tmtest-node-ns",
		NodeIP:         netip.MustParseAddr("10.250.0.11"),
		PodCIDR:        netip.MustParsePrefix("10.244.1.0/24"),
		PodNetnsPrefix: "tmtest-pod-",
		CNIConfDir:     filepath.Join(dir, "cni", "net.d"),
		CNIBinDirs:     []string{filepath.Join(dir, "cni", "bin")},
		CNICacheDir:    filepath.Join(dir, "cni", "cache"),
		StateDir:       filepath.Join(dir, "state", "kubelet"),
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string // substring; "" means valid
	}{
		{"valid", func(*Config) {}, ""},
		{"optional fields empty", func(c *Config) { c.BinDirs, c.Version, c.ServiceHost, c.HeartbeatInterval = nil, "", "", 0 }, ""},
		{"no node name", func(c *Config) { c.NodeName = "" }, "empty node name"},
		{"no netns", func(c *Config) { c.Netns = "" }, "empty node netns"},
		{"no node IP", func(c *Config) { c.NodeIP = netip.Addr{} }, "no node IP"},
		{"no pod CIDR", func(c *Config) { c.PodCIDR = netip.Prefix{} }, "no pod CIDR"},
		{"no pod netns prefix", func(c *Config) { c.PodNetnsPrefix = "" }, "pod netns prefix"},
		{"no CNI conf dir", func(c *Config) { c.CNIConfDir = "" }, "CNI conf/cache dirs"},
		{"no CNI cache dir", func(c *Config) { c.CNICacheDir = "" }, "CNI conf/cache dirs"},
		{"no state dir", func(c *Config) { c.StateDir = "" }, "state dir"},
		{"no CNI bin dirs", func(c *Config) { c.CNIBinDirs = nil }, "no CNI bin dir"},
		{"empty CNI bin dirs", func(c *Config) { c.CNIBinDirs = []string{} }, "no CNI bin dir"},
		{"first problem reported", func(c *Config) { c.NodeName, c.CNIBinDirs = "", nil }, "empty node name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig(t)
			tt.mutate(&c)
			err := c.validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("validate() = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("validate() = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestNew(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	client := &fake.Clientset{}

	t.Run("invalid config", func(t *testing.T) {
		c := validConfig(t)
		c.NodeName = ""
		if k, err := New(c, client, log); err == nil || k != nil {
			t.Fatalf("New() = %v, %v; want error", k, err)
		}
		if _, err := os.Stat(c.StateDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state dir created for an invalid config (stat: %v)", err)
		}
	})
	t.Run("nil client", func(t *testing.T) {
		if k, err := New(validConfig(t), nil, log); err == nil || k != nil || !strings.Contains(err.Error(), "nil client") {
			t.Fatalf("New() = %v, %v; want nil client error", k, err)
		}
	})
	t.Run("nil logger", func(t *testing.T) {
		if k, err := New(validConfig(t), client, nil); err == nil || k != nil || !strings.Contains(err.Error(), "nil logger") {
			t.Fatalf("New() = %v, %v; want nil logger error", k, err)
		}
	})
	t.Run("defaults and state dir", func(t *testing.T) {
		c := validConfig(t)
		k, err := New(c, client, log)
		if err != nil {
			t.Fatal(err)
		}
		if k.cfg.HeartbeatInterval != 10*time.Second {
			t.Errorf("heartbeat interval = %v, want 10s default", k.cfg.HeartbeatInterval)
		}
		if st, err := os.Stat(c.StateDir); err != nil || !st.IsDir() {
			t.Errorf("state dir not created: %v", err)
		}
		if k.workers == nil || k.cni == nil || k.cni.confDir != c.CNIConfDir {
			t.Errorf("kubelet not fully initialized: %+v", k)
		}
	})
	t.Run("explicit heartbeat kept", func(t *testing.T) {
		c := validConfig(t)
		c.HeartbeatInterval = 250 * time.Millisecond
		k, err := New(c, client, log)
		if err != nil {
			t.Fatal(err)
		}
		if k.cfg.HeartbeatInterval != 250*time.Millisecond {
			t.Errorf("heartbeat interval = %v, want 250ms", k.cfg.HeartbeatInterval)
		}
	})
	t.Run("state dir not creatable", func(t *testing.T) {
		c := validConfig(t)
		file := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		c.StateDir = filepath.Join(file, "sub")
		if _, err := New(c, client, log); err == nil {
			t.Fatal("New() with a state dir below a file succeeded")
		}
	})
}

func TestContainerEnv(t *testing.T) {
	client := fake.NewClientset(
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm", Namespace: "ns1"}, Data: map[string]string{"color": "blue"}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sec", Namespace: "ns1"}, Data: map[string][]byte{"token": []byte("s3cret")}},
	)
	k := &Kubelet{cfg: Config{NodeIP: netip.MustParseAddr("10.250.0.11"), ServiceHost: "10.96.0.1"}, client: client}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: "ns1", UID: "uid-1"},
		Spec:       corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "sa"},
	}
	w := &podWorker{k: k, pod: pod, podIP: netip.MustParseAddr("10.244.1.5")}
	field := func(p string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: p}}
	}
	yes := true
	ctx := context.Background()

	c := corev1.Container{Name: "c", Env: []corev1.EnvVar{
		{Name: "POD", ValueFrom: field("metadata.name")},
		{Name: "NS", ValueFrom: field("metadata.namespace")},
		{Name: "UID", ValueFrom: field("metadata.uid")},
		{Name: "NODE", ValueFrom: field("spec.nodeName")},
		{Name: "SA", ValueFrom: field("spec.serviceAccountName")},
		{Name: "POD_IP", ValueFrom: field("status.podIP")},
		{Name: "HOST_IP", ValueFrom: field("status.hostIP")},
		{Name: "COLOR", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cm"}, Key: "color"}}},
		{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "sec"}, Key: "token"}}},
		{Name: "OPT", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "missing"}, Key: "x", Optional: &yes}}},
		{Name: "URL", Value: "http://$(POD_IP):$(PORT)/$(POD)"}, // PORT is defined later: left as is
		{Name: "PORT", Value: "8080"},
		{Name: "HOSTNAME", Value: "override-$(HOSTNAME)"},
		{Name: "ESC", Value: "$$(POD)"},
	}}
	env, m, err := w.containerEnv(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"PATH=" + os.Getenv("PATH"),
		"HOSTNAME=override-web-0",
		"KUBERNETES_SERVICE_HOST=10.96.0.1",
		"KUBERNETES_SERVICE_PORT=443",
		"POD=web-0", "NS=ns1", "UID=uid-1", "NODE=node-a", "SA=sa",
		"POD_IP=10.244.1.5", "HOST_IP=10.250.0.11",
		"COLOR=blue", "TOKEN=s3cret", "OPT=",
		"URL=http://10.244.1.5:$(PORT)/web-0",
		"PORT=8080",
		"ESC=$(POD)",
	}
	if !slices.Equal(env, want) {
		t.Errorf("env =\n%q\nwant\n%q", env, want)
	}
	if m["HOSTNAME"] != "override-web-0" || m["TOKEN"] != "s3cret" || len(m) != len(want) {
		t.Errorf("env map = %v", m)
	}

	for _, tt := range []struct {
		name string
		e    corev1.EnvVar
	}{
		{"unsupported fieldRef", corev1.EnvVar{Name: "X", ValueFrom: field("metadata.labels")}},
		{"missing configmap", corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "nope"}, Key: "k"}}}},
		{"missing configmap key", corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cm"}, Key: "nokey"}}}},
		{"missing secret key", corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "sec"}, Key: "nokey"}}}},
		{"resourceFieldRef unsupported", corev1.EnvVar{Name: "X", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.cpu"}}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := w.containerEnv(ctx, corev1.Container{Name: "c", Env: []corev1.EnvVar{tt.e}})
			if err == nil || !strings.Contains(err.Error(), `env "X"`) {
				t.Fatalf("containerEnv() error = %v, want an error naming env \"X\"", err)
			}
		})
	}
}
