package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestInstallTransportFlags: install --transport wireguard --encrypt-all
// writes the cluster-wide settings, as does --wireguard-required;
// --encrypt-all or --wireguard-required alone is refused.
func TestInstallTransportFlags(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "none"))
	code, out, stderr := runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.244.0.0/16,10.96.0.0/12", "--transport", "wireguard", "--encrypt-all")
	if code != 0 {
		t.Fatalf("install: exit %d: %s", code, stderr)
	}
	for _, want := range []string{"transport: wireguard", `encryptAll: "true"`, "--transport=$(TRANSPORT)", "--encrypt-all=$(ENCRYPT_ALL)"} {
		if !strings.Contains(out, want) {
			t.Errorf("install output lacks %q", want)
		}
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.0.0.0/8", "--encrypt-all")
	if code == 0 || !strings.Contains(stderr, "encryptAll=true needs transport=wireguard") {
		t.Errorf("--encrypt-all without wireguard: exit %d, %q", code, stderr)
	}
	code, out, stderr = runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.0.0.0/8", "--transport", "wireguard", "--wireguard-required")
	if code != 0 || !strings.Contains(out, `wireguardRequired: "true"`) || !strings.Contains(out, "--wireguard-required=$(WIREGUARD_REQUIRED)") {
		t.Errorf("--wireguard-required: exit %d, %q", code, stderr)
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.0.0.0/8", "--wireguard-required")
	if code == 0 || !strings.Contains(stderr, "wireguardRequired=true needs transport=wireguard") {
		t.Errorf("--wireguard-required without wireguard: exit %d, %q", code, stderr)
	}
	code, _, stderr = runWith(t, &recorder{}, "install", "--set", "clusterCIDRs=10.0.0.0/8", "--transport", "ipsec")
	if code != 2 || !strings.Contains(stderr, "transport") {
		t.Errorf("--transport ipsec: exit %d, %q", code, stderr)
	}
}
