package devcluster

import (
	"fmt"
	"math"

	"golang.org/x/sys/unix"
)

// cloexecInherited marks every descriptor from 3 up close-on-exec. Go
// opens its own descriptors close-on-exec, so this only reaches ones
// inherited from whoever ran us: `flock LOCK tunmeshctl dev up` passes the
// lock's descriptor down, and the detached supervisor (which lives as long
// as the cluster) would otherwise keep the lock held long after `up`
// returned, so that the next cluster waiting on it never boots.
func cloexecInherited() error {
	if err := unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("mark inherited descriptors close-on-exec: %w", err)
	}
	return nil
}
