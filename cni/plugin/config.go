package plugin

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tunmesh/tunmesh/cni/cniapi"
)

// SupportedVersions are the CNI spec versions the plugin speaks. 0.3.0 and
// 0.3.1 are in because the conflists most clusters ship (kind's kindnet,
// GKE's and kubenet-style templates, the stock Calico and Flannel
// manifests) declare 0.3.1; those versions have ADD and DEL only. 0.4.0 is
// the oldest with CHECK; STATUS and GC need 1.1.0.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// Oldest versions with each command past ADD and DEL.
const (
	minCheckVersion  = "0.4.0"
	minStatusVersion = "1.1.0"
)

// requireVersion refuses a command that the config's CNI version does not
// have. skel refuses them too when the plugin runs as a binary; this keeps
// the in-process API as strict.
func requireVersion(conf *Config, cmd, min string) error {
	ok, err := version.GreaterThanOrEqualTo(conf.CNIVersion, min)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("compare cniVersion %q: %v", conf.CNIVersion, err), "")
	}
	if !ok {
		return types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("CNI %s has no %s (it needs %s or later)", conf.CNIVersion, cmd, min), "")
	}
	return nil
}

// Config is the plugin's network configuration, as found in the conflist:
//
//	{"type": "tunmesh-cni", "socket": "/var/run/tunmesh/cni.sock",
//	 "timeout": "10s", "failOpen": false, "logFile": "/var/log/tunmesh-cni.log"}
//
// plus the fields every plugin gets (cniVersion, name, prevResult, ...).
type Config struct {
	types.PluginConf

	// Socket is the agent's unix socket (absolute path).
	// Default cniapi.DefaultSocket.
	Socket string `json:"socket,omitempty"`
	// RawTimeout bounds each request to the agent, as a Go duration
	// ("10s"); Timeout holds it parsed. Default "10s", at most 5m.
	RawTimeout string        `json:"timeout,omitempty"`
	Timeout    time.Duration `json:"-"`
	// FailOpen lets ADD pass prevResult through, unmeshed, when nothing
	// answers on Socket (and CHECK, STATUS succeed then). It does not
	// cover errors the agent answers: those are reported.
	FailOpen bool `json:"failOpen,omitempty"`
	// LogFile, if set (absolute path), receives the plugin's logs instead
	// of stderr.
	LogFile string `json:"logFile,omitempty"`
}

// Default and limit of Config.Timeout.
const (
	DefaultTimeout = "10s"
	MaxTimeout     = 5 * time.Minute
)

// maxSocketPath is the longest path a unix socket address holds.
const maxSocketPath = 107

// ParseConfig reads the plugin configuration: defaults, then the JSON, then
// validation. Errors are *types.Error: ErrDecodingFailure for malformed JSON,
// ErrIncompatibleCNIVersion for an unsupported cniVersion and
// ErrInvalidNetworkConfig for invalid values. It does not parse prevResult
// (see parsePrevResult).
func ParseConfig(data []byte) (*Config, error) {
	conf := &Config{
		Socket:     cniapi.DefaultSocket,
		RawTimeout: DefaultTimeout,
	}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode tunmesh-cni config: %v", err), "")
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	return conf, nil
}

func (c *Config) validate() *types.Error {
	if !slices.Contains(SupportedVersions, c.CNIVersion) {
		return types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("unsupported \"cniVersion\" %q", c.CNIVersion),
			"tunmesh-cni supports "+strings.Join(SupportedVersions, ", "))
	}
	invalid := func(format string, args ...any) *types.Error {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(format, args...), "")
	}
	switch {
	case !filepath.IsAbs(c.Socket):
		return invalid("invalid \"socket\" %q: not an absolute path", c.Socket)
	case len(c.Socket) > maxSocketPath:
		return invalid("invalid \"socket\" %q: longer than %d bytes", c.Socket, maxSocketPath)
	case strings.ContainsRune(c.Socket, 0):
		return invalid("invalid \"socket\" %q: contains NUL", c.Socket)
	}
	d, err := time.ParseDuration(c.RawTimeout)
	if err != nil {
		return invalid("invalid \"timeout\" %q: %v", c.RawTimeout, err)
	}
	if d <= 0 || d > MaxTimeout {
		return invalid("invalid \"timeout\" %q: must be above 0 and at most %s", c.RawTimeout, MaxTimeout)
	}
	c.Timeout = d
	if c.LogFile != "" && (!filepath.IsAbs(c.LogFile) || strings.ContainsRune(c.LogFile, 0)) {
		return invalid("invalid \"logFile\" %q: not an absolute path", c.LogFile)
	}
	return nil
}

// parsePrevResult returns the primary plugin's result in the current result
// type, converted from conf.CNIVersion. ADD and CHECK require one: the plugin
// only runs chained.
func parsePrevResult(conf *Config) (*types100.Result, error) {
	if conf.RawPrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"missing \"prevResult\": tunmesh-cni must be chained after a primary plugin", "")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode \"prevResult\": %v", err), "")
	}
	res, err := types100.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("convert \"prevResult\": %v", err), "")
	}
	return res, nil
}

// podArgs are the Kubernetes fields of CNI_ARGS.
type podArgs struct {
	Namespace string // K8S_POD_NAMESPACE
	Name      string // K8S_POD_NAME
	UID       string // K8S_POD_UID
}

// parsePodArgs reads CNI_ARGS ("K1=V1;K2=V2"), keeping the Kubernetes pod
// fields and ignoring other keys (runtimes pass IgnoreUnknown,
// K8S_POD_INFRA_CONTAINER_ID and more). A pair without "=" is an error.
func parsePodArgs(s string) (podArgs, error) {
	var p podArgs
	for pair := range strings.SplitSeq(s, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return podArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("invalid CNI_ARGS pair %q: want KEY=VALUE", pair), "")
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		}
	}
	return p, nil
}

// requirePod parses CNI_ARGS and requires the pod's namespace and name. The
// UID stays optional: not every runtime passes K8S_POD_UID, and the agent can
// find it from its pod informer.
func requirePod(s string) (podArgs, error) {
	p, err := parsePodArgs(s)
	if err != nil {
		return podArgs{}, err
	}
	var missing []string
	if p.Namespace == "" {
		missing = append(missing, "K8S_POD_NAMESPACE")
	}
	if p.Name == "" {
		missing = append(missing, "K8S_POD_NAME")
	}
	if len(missing) > 0 {
		return podArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_ARGS lacks %s: tunmesh-cni serves Kubernetes pods only", strings.Join(missing, " and ")),
			fmt.Sprintf("CNI_ARGS=%q", s))
	}
	return p, nil
}
