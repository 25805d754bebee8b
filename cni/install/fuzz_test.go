package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzPatch feeds arbitrary documents to the conflist patcher: it never
// panics, refuses only with ErrInvalidConfig, and what it produces is JSON
// that the runtime loads, with exactly one tunmesh-cni entry, last, that
// patches to itself and unpatches to a list without it.
// Corpus: testdata/fuzz/FuzzPatch (and the primaries of the golden tests).
func FuzzPatch(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "primary", "*.conflist"))
	golden, _ := filepath.Glob(filepath.Join("testdata", "golden", "*.conflist"))
	for _, p := range append(files, golden...) {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		out, err := Patch(data, testPluginConfig)
		if err != nil {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("error %v does not wrap ErrInvalidConfig", err)
			}
			return
		}
		if !json.Valid(out) {
			t.Fatalf("output is not JSON:\n%s", out)
		}
		if err := checkPatched(out, testPluginConfig); err != nil {
			t.Fatalf("%v in:\n%s", err, out)
		}
		again, err := Patch(out, testPluginConfig)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("not idempotent: %v\n%s\n%s", err, out, again)
		}
		un, found, err := Unpatch(out)
		if err != nil && found {
			var list struct{ Plugins []json.RawMessage }
			if jerr := json.Unmarshal(out, &list); jerr != nil || len(list.Plugins) != 1 {
				t.Fatalf("Unpatch refused a list with other plugins: %v\n%s", err, out)
			}
			return // tunmesh-cni was the only plugin: refusing is right
		}
		if err != nil || !found {
			t.Fatalf("Unpatch = %v, %v", found, err)
		}
		if _, found, err := Unpatch(un); err != nil || found {
			t.Fatalf("Unpatch left an entry: %v, %v\n%s", found, err, un)
		}
	})
}
