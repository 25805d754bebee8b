package installcli

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tunmesh/tunmesh/deploy"
)

// TestRenderTransport: the WireGuard settings land in the ConfigMap the
// agent reads (tcp by default); encryptAll or wireguardRequired without
// transport wireguard is refused.
func TestRenderTransport(t *testing.T) {
	for _, tc := range []struct {
		sets                         []string
		transport, encrypt, required string
		wantErr                      bool
	}{
		{sets: nil, transport: "tcp", encrypt: "false", required: "false"},
		{sets: []string{"transport=wireguard"}, transport: "wireguard", encrypt: "false", required: "false"},
		{sets: []string{"transport=wireguard", "encryptAll=true", "wireguardPort=51000"}, transport: "wireguard", encrypt: "true", required: "false"},
		{sets: []string{"transport=wireguard", "wireguardRequired=true"}, transport: "wireguard", encrypt: "false", required: "true"},
		{sets: []string{"transport=wireguard", "encryptAll=true", "wireguardRequired=true"}, transport: "wireguard", encrypt: "true", required: "true"},
		{sets: []string{"encryptAll=true"}, wantErr: true},
		{sets: []string{"wireguardRequired=true"}, wantErr: true},
		{sets: []string{"transport=tcp", "wireguardRequired=true"}, wantErr: true},
		{sets: []string{"transport=wireguard", "wireguardRequired=yes"}, wantErr: true},
		{sets: []string{"transport=ipsec"}, wantErr: true},
		{sets: []string{"wireguardPort=0"}, wantErr: true},
	} {
		set, err := ParseSettings(append([]string{"clusterCIDRs=10.1.0.0/16,10.2.0.0/16"}, tc.sets...))
		var objs []*unstructured.Unstructured
		if err == nil {
			objs, err = Render(Options{Settings: set})
		}
		if tc.wantErr {
			if !errors.Is(err, ErrBadSetting) {
				t.Errorf("%v: err %v, want a bad setting", tc.sets, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%v: %v", tc.sets, err)
		}
		var cm corev1.ConfigMap
		find(t, objs, "ConfigMap", deploy.ConfigMapName, &cm)
		if cm.Data["transport"] != tc.transport || cm.Data["encryptAll"] != tc.encrypt || cm.Data["wireguardRequired"] != tc.required {
			t.Errorf("%v: ConfigMap transport %q encryptAll %q wireguardRequired %q", tc.sets, cm.Data["transport"], cm.Data["encryptAll"], cm.Data["wireguardRequired"])
		}
		// The agent gets it as its flag, from that key.
		var ds unstructured.Unstructured
		for _, o := range objs {
			if o.GetKind() == "DaemonSet" && o.GetName() == "tunmesh-node" {
				ds = *o
			}
		}
		cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
		if !agentReadsRequired(cs) {
			t.Errorf("%v: the agent DaemonSet does not pass wireguardRequired as --wireguard-required", tc.sets)
		}
	}
}

// agentReadsRequired: the agent container has --wireguard-required from
// the ConfigMap key wireguardRequired.
func agentReadsRequired(containers []any) bool {
	for _, c := range containers {
		m, _ := c.(map[string]any)
		if m["name"] != "agent" {
			continue
		}
		args, _, _ := unstructured.NestedStringSlice(m, "args")
		hasArg := false
		for _, a := range args {
			hasArg = hasArg || a == "--wireguard-required=$(WIREGUARD_REQUIRED)"
		}
		env, _, _ := unstructured.NestedSlice(m, "env")
		for _, e := range env {
			em, _ := e.(map[string]any)
			key, _, _ := unstructured.NestedString(em, "valueFrom", "configMapKeyRef", "key")
			if em["name"] == "WIREGUARD_REQUIRED" && key == "wireguardRequired" {
				return hasArg
			}
		}
	}
	return false
}
