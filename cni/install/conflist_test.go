package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

func TestPatch(t *testing.T) {
	pc := PluginConfig{Socket: "/run/s.sock", Timeout: "3s", FailOpen: true}
	const ours = `{"type":"tunmesh-cni","socket":"/run/s.sock","timeout":"3s","failOpen":true}`
	for _, tc := range []struct{ name, in, want string }{
		{
			"compact append",
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}`,
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},` + ours + `]}`,
		},
		{
			"stale entry replaced",
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}, {"type":"tunmesh-cni","socket":"/old"}]}`,
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}, ` + ours + `]}`,
		},
		{
			"entry moved last, duplicates dropped",
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"tunmesh-cni"},{"type":"bridge"},{"type":"tunmesh-cni"},{"type":"portmap","x":[1,"]"]}]}`,
			`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap","x":[1,"]"]},` + ours + `]}`,
		},
		{
			"other keys keep order and bytes",
			`{"z":1,"plugins":[ {"type":"a","b":"\u00e9\"]"} ],"name":"n","cniVersion":"1.1.0","a":[]}`,
			`{"z":1,"plugins":[ {"type":"a","b":"\u00e9\"]"}, ` + ours + ` ],"name":"n","cniVersion":"1.1.0","a":[]}`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Patch([]byte(tc.in), pc)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
			again, err := Patch(got, pc)
			if err != nil || !bytes.Equal(again, got) {
				t.Fatalf("patch not idempotent: %s, %v", again, err)
			}
			if err := checkPatched(got, pc); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestPatchRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, in    string
		unsupported bool
	}{
		{"malformed", `{"cniVersion":"1.0.0","name":"n","plugins":[`, false},
		{"not an object", `[]`, false},
		{"no name", `{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}`, false},
		{"no plugins", `{"cniVersion":"1.0.0","name":"n"}`, false},
		{"empty plugins", `{"cniVersion":"1.0.0","name":"n","plugins":[]}`, false},
		{"plugins not a list", `{"cniVersion":"1.0.0","name":"n","plugins":{}}`, false},
		{"plugin without type", `{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"cni0"}]}`, false},
		{"plugin not an object", `{"cniVersion":"1.0.0","name":"n","plugins":["bridge"]}`, false},
		{"duplicate plugins", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"}],"plugins":[{"type":"b"}]}`, false},
		{"old version", `{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}`, true},
		{"no version", `{"name":"n","plugins":[{"type":"bridge"}]}`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Patch([]byte(tc.in), testPluginConfig)
			if !errors.Is(err, ErrInvalidConfig) || errors.Is(err, ErrUnsupportedVersion) != tc.unsupported {
				t.Fatalf("Patch error %v; want ErrInvalidConfig, unsupported version %v", err, tc.unsupported)
			}
		})
	}
}

func TestUnpatch(t *testing.T) {
	in := `{"cniVersion":"0.3.1","name":"n","plugins":[{"type":"tunmesh-cni"},{"type":"bridge"},{"type":"tunmesh-cni"}]}`
	got, found, err := Unpatch([]byte(in))
	if err != nil || !found || string(got) != `{"cniVersion":"0.3.1","name":"n","plugins":[{"type":"bridge"}]}` {
		t.Fatalf("Unpatch = %s, %v, %v", got, found, err)
	}
	same, found, err := Unpatch(got)
	if err != nil || found || !bytes.Equal(same, got) {
		t.Fatalf("Unpatch without entry = %s, %v, %v", same, found, err)
	}
	if _, found, err := Unpatch([]byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"tunmesh-cni"}]}`)); err == nil || !found {
		t.Fatalf("Unpatch of a list of only ours: found %v, err %v; want an error", found, err)
	}
}

func TestConfToConflist(t *testing.T) {
	out, err := ConfToConflist([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ptp","ipam":{"type":"host-local"}}`))
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion, Name string
		Plugins          []json.RawMessage
	}
	if err := json.Unmarshal(out, &list); err != nil || list.CNIVersion != "1.0.0" || list.Name != "n" || len(list.Plugins) != 1 {
		t.Fatalf("ConfToConflist = %s, %v", out, err)
	}
	for _, bad := range []string{`{"cniVersion":"1.0.0","name":"n"}`, `{"cniVersion":"1.0.0","type":"ptp"}`, `{"cniVersion":"0.2.0","name":"n","type":"ptp"}`, `{`} {
		if _, err := ConfToConflist([]byte(bad)); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("ConfToConflist(%s) error %v, want ErrInvalidConfig", bad, err)
		}
	}
}
