package devcluster

import "testing"

// TestTransportConfig: tcp by default; wireguard with or without
// encrypt-all; encrypt-all alone or an unknown transport refused.
func TestTransportConfig(t *testing.T) {
	for _, tc := range []struct {
		transport  string
		encryptAll bool
		want       string // "" = refused
	}{
		{"", false, "tcp"},
		{"tcp", false, "tcp"},
		{"wireguard", false, "wireguard"},
		{"wireguard", true, "wireguard"},
		{"", true, ""},
		{"tcp", true, ""},
		{"ipsec", false, ""},
	} {
		cfg, err := Config{Name: "wg", BinDir: "/b", Mesh: true, Transport: tc.transport, EncryptAll: tc.encryptAll}.WithDefaults()
		if tc.want == "" {
			if err == nil {
				t.Errorf("%q encrypt-all %v: accepted", tc.transport, tc.encryptAll)
			}
			continue
		}
		if err != nil || cfg.Transport != tc.want {
			t.Errorf("%q encrypt-all %v: transport %q err %v, want %q", tc.transport, tc.encryptAll, cfg.Transport, err, tc.want)
		}
	}
}
