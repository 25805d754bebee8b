package agent

import "testing"

// TestWireGuardConfigCheck: tcp by default, wireguard with or without
// encrypt-all; encrypt-all without wireguard and unknown transports are
// refused.
func TestWireGuardConfigCheck(t *testing.T) {
	for _, tc := range []struct {
		c  WireGuardConfig
		ok bool
	}{
		{WireGuardConfig{}, true},
		{WireGuardConfig{Transport: TransportTCP}, true},
		{WireGuardConfig{Transport: TransportWireGuard}, true},
		{WireGuardConfig{Transport: TransportWireGuard, EncryptAll: true}, true},
		{WireGuardConfig{EncryptAll: true}, false},
		{WireGuardConfig{Transport: TransportTCP, EncryptAll: true}, false},
		{WireGuardConfig{Transport: "ipsec"}, false},
		{WireGuardConfig{Transport: TransportWireGuard, EncryptAll: true, Required: true}, true},
		{WireGuardConfig{Required: true}, false},
	} {
		if err := tc.c.check(); (err == nil) != tc.ok {
			t.Errorf("%+v: err %v, want ok %v", tc.c, err, tc.ok)
		}
	}
}
