package devcluster

import (
	"strings"
	"testing"
)

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

// TestWireGuardRequiredConfig: strict mode needs transport wireguard, and
// reaches the agents as --wireguard-required.
func TestWireGuardRequiredConfig(t *testing.T) {
	for _, transport := range []string{"", "tcp"} {
		if _, err := (Config{Name: "wg", BinDir: "/b", Mesh: true, Transport: transport, WireGuardRequired: true}).WithDefaults(); err == nil {
			t.Errorf("wireguard-required with transport %q accepted", transport)
		}
	}
	cfg, err := Config{Name: "wg", BinDir: "/b", Mesh: true, Transport: "wireguard", WireGuardRequired: true, WireGuardMTU: 8920}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join((&mesh{cfg: cfg}).wireGuardArgs(), " "); got != "--wireguard-mtu 8920 --wireguard-required" {
		t.Errorf("agent args %q", got)
	}
	cfg.WireGuardRequired, cfg.WireGuardMTU = false, 0
	if got := (&mesh{cfg: cfg}).wireGuardArgs(); len(got) != 0 {
		t.Errorf("agent args %q, want none", got)
	}
}
