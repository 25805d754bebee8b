package admin

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PluginType is the CNI type name of tunmesh's chained plugin.
const PluginType = "tunmesh-cni"

// CNIReport says whether the node's CNI configuration chains tunmesh.
type CNIReport struct {
	ConfDir string `json:"confDir"`
	// File is the configuration the runtime uses: the first of the
	// directory in lexical order with a .conflist, .conf or .json name,
	// as libcni picks it. Empty when there is none.
	File    string   `json:"file,omitempty"`
	Plugins []string `json:"plugins,omitempty"` // plugin types, in chain order
	Chained bool     `json:"chained"`           // PluginType is in Plugins
	Error   string   `json:"error,omitempty"`
}

// CheckCNIConf reads (only reads) the first CNI configuration in dir.
func CheckCNIConf(dir string) CNIReport {
	r := CNIReport{ConfDir: dir}
	ents, err := os.ReadDir(dir)
	if err != nil {
		r.Error = fmt.Sprintf("read CNI conf dir: %v", err)
		return r
	}
	var names []string
	for _, e := range ents {
		switch filepath.Ext(e.Name()) {
		case ".conflist", ".conf", ".json":
			if !e.IsDir() {
				names = append(names, e.Name())
			}
		}
	}
	slices.Sort(names)
	if len(names) == 0 {
		r.Error = "no CNI configuration in " + dir
		return r
	}
	r.File = names[0]
	b, err := os.ReadFile(filepath.Join(dir, r.File))
	if err != nil {
		r.Error = fmt.Sprintf("read %s: %v", r.File, err)
		return r
	}
	var conf struct {
		Type    string `json:"type"`
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &conf); err != nil {
		r.Error = fmt.Sprintf("parse %s: %v", r.File, err)
		return r
	}
	if strings.HasSuffix(r.File, ".conflist") || len(conf.Plugins) > 0 {
		for _, p := range conf.Plugins {
			r.Plugins = append(r.Plugins, p.Type)
		}
	} else if conf.Type != "" {
		r.Plugins = []string{conf.Type}
	}
	r.Chained = slices.Contains(r.Plugins, PluginType)
	return r
}
