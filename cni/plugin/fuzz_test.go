package plugin

import (
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// FuzzParseConfig feeds arbitrary configs to the parser and, when they parse,
// to the prevResult parser and the result printer: none may panic, errors
// must be CNI errors with the documented codes, and accepted configs must
// hold valid values. Corpus: testdata/fuzz/FuzzParseConfig.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"tunmesh-cni"}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"k8s","type":"tunmesh-cni","socket":"/run/tunmesh/cni.sock","timeout":"3s","failOpen":true,"logFile":"/var/log/tunmesh-cni.log"}`))
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"k8s","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","address":"10.0.0.2/24","interface":0}]}}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24","interface":-1}]}}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","timeout":"1h"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := ParseConfig(data)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v (%T) is not a *types.Error", err, err)
			}
			switch e.Code {
			case types.ErrDecodingFailure, types.ErrIncompatibleCNIVersion, types.ErrInvalidNetworkConfig:
			default:
				t.Fatalf("unexpected code %d: %v", e.Code, e)
			}
			return
		}
		switch {
		case !slices.Contains(SupportedVersions, conf.CNIVersion):
			t.Fatalf("accepted cniVersion %q", conf.CNIVersion)
		case !filepath.IsAbs(conf.Socket) || len(conf.Socket) > maxSocketPath:
			t.Fatalf("accepted socket %q", conf.Socket)
		case conf.Timeout <= 0 || conf.Timeout > MaxTimeout:
			t.Fatalf("accepted timeout %v", conf.Timeout)
		case conf.LogFile != "" && !filepath.IsAbs(conf.LogFile):
			t.Fatalf("accepted logFile %q", conf.LogFile)
		}
		res, err := parsePrevResult(conf)
		if err != nil {
			return
		}
		_ = podIPs(res)
		addInterface(res, "tm0", "/var/run/netns/p")
		p := &Plugin{Stdout: io.Discard, Stderr: io.Discard}
		_ = p.print(res, conf.CNIVersion)
	})
}

// FuzzParsePodArgs checks the CNI_ARGS parser never panics and that what it
// reads round-trips.
func FuzzParsePodArgs(f *testing.F) {
	f.Add(podCNIArgs)
	f.Add("K8S_POD_NAME=a;;K8S_POD_NAMESPACE=b;")
	f.Add("junk")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parsePodArgs(s)
		if err != nil {
			return
		}
		for _, v := range []string{p.Namespace, p.Name, p.UID} {
			if strings.Contains(v, ";") {
				t.Fatalf("value %q holds a separator", v)
			}
		}
	})
}
