// Command tunmesh-pause is the process of the pause (sandbox) image the
// local cluster's containerd runs for every pod: it holds the pod's
// namespaces and does nothing else. It exits 0 on SIGTERM or SIGINT and, as
// PID 1 of a pod that shares its PID namespace, reaps orphaned children.
package main

import (
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGCHLD)
	for s := range sigs {
		if s != unix.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
