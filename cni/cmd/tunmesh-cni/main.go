// Command tunmesh-cni is the tunmesh chained CNI plugin. It is run by the
// container runtime after the primary plugin; see package plugin for what it
// does.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tunmesh/tunmesh/cni/plugin"
)

func init() {
	// CNI plugins keep the main goroutine on one OS thread, so that any
	// namespace switch stays on the thread that made it.
	runtime.LockOSThread()
}

func main() {
	var p plugin.Plugin // the zero value writes to os.Stdout and os.Stderr
	skel.PluginMainFuncs(
		skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, GC: p.GC, Status: p.Status},
		version.PluginSupports(plugin.SupportedVersions...),
		plugin.About,
	)
}
