package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"

	"github.com/tunmesh/tunmesh/cni/plugin"
)

// PluginType is the "type" of the tunmesh entry in a conflist, and the name
// of the plugin binary in the CNI bin dir.
const PluginType = "tunmesh-cni"

// ErrInvalidConfig marks a CNI config the installer refuses to edit:
// malformed JSON, not a valid CNI network config, or a cniVersion that
// tunmesh-cni does not speak. Such a file is never written.
var ErrInvalidConfig = errors.New("invalid CNI config")

// ErrUnsupportedVersion marks a valid CNI config whose cniVersion
// tunmesh-cni does not speak; it comes wrapped with ErrInvalidConfig.
var ErrUnsupportedVersion = errors.New("unsupported cniVersion")

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, args...))
}

// span is a byte range [start, end) of a JSON document.
type span struct{ start, end int }

// conflistDoc is a parsed conflist that remembers where its "plugins" array
// and each entry sit in data, so that edits splice bytes and leave everything
// else, down to the whitespace, as it was.
type conflistDoc struct {
	data    []byte
	plugins span     // from '[' to just after ']'
	entries []span   // each plugin entry (a JSON object)
	types   []string // each entry's "type"
}

// parseConflist checks that data is a conflist the runtime accepts (as
// libcni reads it) with an inline, non-empty "plugins" array and, with
// checkVer, a cniVersion tunmesh-cni supports, and locates its entries.
func parseConflist(data []byte, checkVer bool) (*conflistDoc, error) {
	if !json.Valid(data) {
		return nil, invalidf("malformed JSON")
	}
	list, err := libcni.NetworkConfFromBytes(data)
	if err != nil {
		return nil, invalidf("%v", err)
	}
	if checkVer {
		if err := checkVersion(list.CNIVersion); err != nil {
			return nil, err
		}
	}
	doc := &conflistDoc{data: data}
	i := skipSpace(data, 0)
	if data[i] != '{' {
		return nil, invalidf("not a JSON object")
	}
	found := false
	i = skipSpace(data, i+1)
	for data[i] != '}' {
		keyEnd := skipValue(data, i)
		var key string
		if err := json.Unmarshal(data[i:keyEnd], &key); err != nil {
			return nil, invalidf("key: %v", err)
		}
		i = skipSpace(data, keyEnd)
		i = skipSpace(data, i+1) // ':'
		valEnd := skipValue(data, i)
		if key == "plugins" {
			if found {
				return nil, invalidf(`duplicate "plugins" key`)
			}
			found = true
			if data[i] != '[' {
				return nil, invalidf(`"plugins" is not an array`)
			}
			doc.plugins = span{i, valEnd}
		}
		i = skipSpace(data, valEnd)
		if data[i] == ',' {
			i = skipSpace(data, i+1)
		}
	}
	if !found {
		return nil, invalidf(`no inline "plugins" array`)
	}
	j := skipSpace(data, doc.plugins.start+1)
	for data[j] != ']' {
		end := skipValue(data, j)
		if data[j] != '{' {
			return nil, invalidf("plugin %d is not an object", len(doc.entries))
		}
		var e struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(data[j:end], &e); err != nil {
			return nil, invalidf("plugin %d: %v", len(doc.entries), err)
		}
		doc.entries = append(doc.entries, span{j, end})
		doc.types = append(doc.types, e.Type)
		j = skipSpace(data, end)
		if data[j] == ',' {
			j = skipSpace(data, j+1)
		}
	}
	if len(doc.entries) == 0 {
		return nil, invalidf(`empty "plugins" array`)
	}
	return doc, nil
}

// checkVersion refuses cniVersions the plugin cannot be run with: the
// runtime would fail every pod's ADD on them.
func checkVersion(v string) error {
	if !slices.Contains(plugin.SupportedVersions, v) {
		return fmt.Errorf("%w: %w: %s supports %s, not %q", ErrInvalidConfig, ErrUnsupportedVersion,
			PluginType, strings.Join(plugin.SupportedVersions, ", "), v)
	}
	return nil
}

// ours reports whether the doc has a tunmesh entry.
func (d *conflistDoc) ours() bool { return slices.Contains(d.types, PluginType) }

// rebuild returns the document with the plugins array made of the entries
// for which keep is true, in order, followed by extra (if not nil). The
// whitespace after '[', between entries and before ']' is reused from the
// original so that untouched entries and their layout keep their bytes.
func (d *conflistDoc) rebuild(keep func(i int) bool, extra []byte) []byte {
	data := d.data
	first, last := d.entries[0], d.entries[len(d.entries)-1]
	lead := data[d.plugins.start+1 : first.start] // whitespace after '['
	trail := data[last.end : d.plugins.end-1]     // whitespace before ']'
	sep := append([]byte{','}, lead...)
	if len(d.entries) > 1 {
		sep = data[first.end:d.entries[1].start]
	}
	var parts [][]byte
	for i, e := range d.entries {
		if keep(i) {
			parts = append(parts, data[e.start:e.end])
		}
	}
	if extra != nil {
		parts = append(parts, extra)
	}
	var b bytes.Buffer
	b.Write(data[:d.plugins.start+1])
	if len(parts) > 0 {
		b.Write(lead)
		b.Write(bytes.Join(parts, sep))
		b.Write(trail)
	}
	b.Write(data[d.plugins.end-1:])
	return b.Bytes()
}

// indents guesses the layout of the plugins array: the indentation of an
// entry and one indentation step. An array written on one line gives ok
// false: the entry is then written compact.
func (d *conflistDoc) indents() (prefix, unit string, ok bool) {
	lead := string(d.data[d.plugins.start+1 : d.entries[0].start])
	nl := strings.LastIndexByte(lead, '\n')
	if nl < 0 {
		return "", "", false
	}
	prefix = lead[nl+1:]
	unit = "  "
	if prefix != "" && strings.Trim(prefix, "\t") == "" {
		unit = "\t" // a tab-indented file (kindnet's) stays tab-indented
	}
	trail := string(d.data[d.entries[len(d.entries)-1].end : d.plugins.end-1])
	if nl := strings.LastIndexByte(trail, '\n'); nl >= 0 {
		closing := trail[nl+1:]
		if len(prefix) > len(closing) && strings.HasPrefix(prefix, closing) {
			unit = prefix[len(closing):]
		}
	}
	return prefix, unit, true
}

// pluginEntry is the tunmesh entry as written into a conflist.
type pluginEntry struct {
	Type string `json:"type"`
	PluginConfig
}

func (d *conflistDoc) render(pc PluginConfig) []byte {
	e := pluginEntry{Type: PluginType, PluginConfig: pc}
	var b []byte
	if prefix, unit, ok := d.indents(); ok {
		b, _ = json.MarshalIndent(e, prefix, unit) // cannot fail: strings and a bool
	} else {
		b, _ = json.Marshal(e)
	}
	return b
}

// Patch returns the conflist data with exactly one tunmesh-cni entry, made
// from pc, as the last plugin: it is appended, or an existing entry is
// replaced (and moved last; duplicates are dropped). Everything else keeps
// its bytes. Patching its own output returns the same bytes. Errors wrap
// ErrInvalidConfig.
func Patch(data []byte, pc PluginConfig) ([]byte, error) {
	doc, err := parseConflist(data, true)
	if err != nil {
		return nil, err
	}
	return doc.rebuild(func(i int) bool { return doc.types[i] != PluginType }, doc.render(pc)), nil
}

// Unpatch returns the conflist data without tunmesh-cni entries, and whether
// there were any. Undoing Patch of a file without an entry gives back its
// bytes. Errors wrap ErrInvalidConfig.
func Unpatch(data []byte) ([]byte, bool, error) {
	doc, err := parseConflist(data, false)
	if err != nil {
		return nil, false, err
	}
	if !doc.ours() {
		return data, false, nil
	}
	if !slices.ContainsFunc(doc.types, func(t string) bool { return t != PluginType }) {
		// Only our entries: an empty list is invalid, and the runtime must
		// not run the plugin once it is gone. Refuse rather than break.
		return nil, true, invalidf("%s is the only plugin", PluginType)
	}
	return doc.rebuild(func(i int) bool { return doc.types[i] != PluginType }, nil), true, nil
}

// ConfToConflist turns a single-plugin config (a .conf) into the equivalent
// conflist: the list takes the conf's cniVersion and name, and the conf,
// unchanged but for indentation, is its only plugin. Errors wrap
// ErrInvalidConfig.
func ConfToConflist(data []byte) ([]byte, error) {
	if !json.Valid(data) {
		return nil, invalidf("malformed JSON")
	}
	conf, err := libcni.NetworkPluginConfFromBytes(data)
	if err != nil {
		return nil, invalidf("%v", err)
	}
	if conf.Network.Name == "" {
		return nil, invalidf("no name")
	}
	if err := checkVersion(conf.Network.CNIVersion); err != nil {
		return nil, err
	}
	var top struct {
		CNIVersion json.RawMessage `json:"cniVersion"`
		Name       json.RawMessage `json:"name"`
	}
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, invalidf("%v", err)
	}
	var entry bytes.Buffer
	if err := json.Indent(&entry, bytes.TrimSpace(data), "    ", "  "); err != nil {
		return nil, invalidf("%v", err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "{\n  \"cniVersion\": %s,\n  \"name\": %s,\n  \"plugins\": [\n    %s\n  ]\n}\n",
		top.CNIVersion, top.Name, entry.Bytes())
	return b.Bytes(), nil
}

// skipSpace returns the index of the first non-space byte at or after i.
func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// skipValue returns the end of the JSON value starting at i. data must be
// valid JSON (json.Valid) and i the start of a value.
func skipValue(data []byte, i int) int {
	switch data[i] {
	case '"':
		for i++; i < len(data); i++ {
			switch data[i] {
			case '\\':
				i++
			case '"':
				return i + 1
			}
		}
		return i
	case '{', '[':
		depth := 0
		for ; i < len(data); i++ {
			switch data[i] {
			case '"':
				i = skipValue(data, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return i
	default: // number, true, false, null
		for i < len(data) && !strings.ContainsRune(" \t\r\n,]}", rune(data[i])) {
			i++
		}
		return i
	}
}
