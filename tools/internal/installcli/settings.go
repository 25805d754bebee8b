// Package installcli renders tunmesh's manifests for `tunmeshctl install`
// (images, settings, the generated or given identity issuer, the cluster's
// CIDRs), prints what `tunmeshctl uninstall` deletes, and runs the
// data-plane checks of `tunmeshctl check`.
package installcli

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// ErrBadSetting marks a --set the installer does not accept.
var ErrBadSetting = errors.New("bad setting")

// setting is one `--set key=value`.
type setting struct {
	// configMap: the value goes into the tunmesh-config ConfigMap under
	// the same key (the pods read it as an environment variable);
	// otherwise render applies it to the objects itself.
	configMap bool
	def       string
	help      string
	check     func(string) error
}

// Settings are the keys `--set` accepts, with their defaults and checks.
var settings = map[string]setting{
	"clusterCIDRs":      {configMap: true, help: "pod and Service CIDRs, comma-separated (default: detected from the cluster)", check: checkCIDRs},
	"trustDomain":       {configMap: true, def: "cluster.local", help: "SPIFFE trust domain", check: spiffe.ValidateTrustDomain},
	"certLifetime":      {configMap: true, def: "24h", help: "workload certificate lifetime", check: checkDuration},
	"tunMTU":            {configMap: true, def: "65520", help: "MTU of the pods' tm0", check: checkInt(1280, 65535)},
	"underlayMTU":       {configMap: true, def: "1500", help: "MTU of the node network", check: checkInt(576, 65535)},
	"failOpen":          {configMap: true, def: "false", help: "let pods start unmeshed while their node's agent is down", check: checkBool},
	"logLevel":          {configMap: true, def: "info", help: "debug, info, warn or error", check: checkOneOf("debug", "info", "warn", "error")},
	"transport":         {configMap: true, def: "tcp", help: "transport between nodes: tcp, or wireguard (userspace WireGuard; docs/wireguard.md)", check: checkOneOf("tcp", "wireguard")},
	"encryptAll":        {configMap: true, def: "false", help: "with transport wireguard: all cross-node pod traffic (UDP, ICMP, non-meshed pods, skipped ports) rides WireGuard", check: checkBool},
	"wireguardPort":     {configMap: true, def: "51820", help: "WireGuard UDP port on the nodes", check: checkInt(1, 65535)},
	"wireguardRequired": {configMap: true, def: "false", help: "with transport wireguard, strict (once every node runs it): nodes that publish no WireGuard key are refused and, with encryptAll, their pods' traffic dropped, never sent on the underlay", check: checkBool},

	"identityReplicas":   {def: "1", help: "tunmesh-identity replicas", check: checkInt(1, 100)},
	"imagePullPolicy":    {def: "IfNotPresent", help: "Always, IfNotPresent or Never", check: checkOneOf("Always", "IfNotPresent", "Never")},
	"cniBinDir":          {def: "/opt/cni/bin", help: "the nodes' CNI bin dir", check: checkAbs},
	"cniConfDir":         {def: "/etc/cni/net.d", help: "the nodes' CNI conf dir", check: checkAbs},
	"netnsDir":           {def: "/var/run/netns", help: "where the runtime mounts pod network namespaces (the path it passes as CNI_NETNS)", check: checkAbs},
	"containerdNetnsDir": {def: "/run/containerd/io.containerd.grpc.v1.cri/netns", help: "containerd's netns dir with netns_mounts_under_state_dir", check: checkAbs},
}

// SettingKeys lists the keys `--set` accepts, sorted.
func SettingKeys() []string {
	var keys []string
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// SettingsHelp describes every key, for --help.
func SettingsHelp() string {
	var b strings.Builder
	for _, k := range SettingKeys() {
		s := settings[k]
		fmt.Fprintf(&b, "  %-19s %s", k, s.help)
		if s.def != "" {
			fmt.Fprintf(&b, " (default %s)", s.def)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// ParseSettings reads `key=value` pairs (later ones win) and checks them.
func ParseSettings(pairs []string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			return nil, fmt.Errorf("%w: %q: want key=value", ErrBadSetting, p)
		}
		s, known := settings[k]
		if !known {
			return nil, fmt.Errorf("%w: unknown key %q (known: %s)", ErrBadSetting, k, strings.Join(SettingKeys(), ", "))
		}
		if err := s.check(v); err != nil {
			return nil, fmt.Errorf("%w: %s=%q: %w", ErrBadSetting, k, v, err)
		}
		out[k] = v
	}
	return out, nil
}

// withDefaults returns the settings with every unset key at its default.
func withDefaults(set map[string]string) map[string]string {
	out := map[string]string{}
	for k, s := range settings {
		out[k] = s.def
	}
	for k, v := range set {
		out[k] = v
	}
	return out
}

func checkCIDRs(v string) error {
	if strings.TrimSpace(v) == "" {
		return errors.New("empty")
	}
	for c := range strings.SplitSeq(v, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			return err
		}
		if p != p.Masked() {
			return fmt.Errorf("%s has host bits set (did you mean %s?)", p, p.Masked())
		}
	}
	return nil
}

func checkDuration(v string) error {
	d, err := time.ParseDuration(v)
	if err == nil && d <= 0 {
		err = errors.New("not positive")
	}
	return err
}

func checkInt(lo, hi int) func(string) error {
	return func(v string) error {
		n, err := strconv.Atoi(v)
		if err != nil {
			return err
		}
		if n < lo || n > hi {
			return fmt.Errorf("want %d to %d", lo, hi)
		}
		return nil
	}
}

func checkBool(v string) error {
	if v != "true" && v != "false" {
		return errors.New("want true or false")
	}
	return nil
}

func checkOneOf(vals ...string) func(string) error {
	return func(v string) error {
		if !slices.Contains(vals, v) {
			return fmt.Errorf("want one of %s", strings.Join(vals, ", "))
		}
		return nil
	}
}

func checkAbs(v string) error {
	if !filepath.IsAbs(v) || filepath.Clean(v) != v {
		return errors.New("want a clean absolute path")
	}
	return nil
}
