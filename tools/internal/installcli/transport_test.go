package installcli

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tunmesh/tunmesh/deploy"
)

// TestRenderTransport: the WireGuard settings land in the ConfigMap the
// agent reads (tcp by default); encryptAll without transport wireguard is
// refused.
func TestRenderTransport(t *testing.T) {
	for _, tc := range []struct {
		sets               []string
		transport, encrypt string
		wantErr            bool
	}{
		{sets: nil, transport: "tcp", encrypt: "false"},
		{sets: []string{"transport=wireguard"}, transport: "wireguard", encrypt: "false"},
		{sets: []string{"transport=wireguard", "encryptAll=true", "wireguardPort=51000"}, transport: "wireguard", encrypt: "true"},
		{sets: []string{"encryptAll=true"}, wantErr: true},
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
		if cm.Data["transport"] != tc.transport || cm.Data["encryptAll"] != tc.encrypt {
			t.Errorf("%v: ConfigMap transport %q encryptAll %q", tc.sets, cm.Data["transport"], cm.Data["encryptAll"])
		}
	}
}
