package netstack

import (
	"fmt"
	"os"
	"reflect"
	"strconv"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// closeDispatcherEventFDs closes the eventfds that fdbased.New creates (one
// per inbound dispatcher, to interrupt the blocking read) and never closes:
// gVisor's stopfd.StopFD has a Stop but no Close, and fdbased's Close is a
// no-op. Without this every detached pod NIC leaks one fd, which over weeks
// of pod churn exhausts the agent's fd limit.
//
// The fields are unexported, so this reads them by reflection
// (endpoint.inboundDispatchers[i].StopFD.EFD) and closes an fd only if
// /proc says it is an eventfd. Call it only after the endpoint was detached
// (Attach(nil) has stopped and waited for the readers) or was never
// attached. If gVisor's layout changes it returns an error and closes
// nothing; TestCloseReleasesGoroutinesAndFDs catches that on upgrade.
func closeDispatcherEventFDs(ep stack.LinkEndpoint) error {
	v := reflect.ValueOf(ep)
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("fdbased endpoint is a %T", ep)
	}
	dispatchers := v.Elem().FieldByName("inboundDispatchers")
	if !dispatchers.IsValid() || dispatchers.Kind() != reflect.Slice {
		return fmt.Errorf("%T has no inboundDispatchers slice", ep)
	}
	var fds []int
	for i := range dispatchers.Len() {
		d := dispatchers.Index(i)
		for d.Kind() == reflect.Interface || d.Kind() == reflect.Pointer {
			if d.IsNil() {
				return fmt.Errorf("%T: nil dispatcher %d", ep, i)
			}
			d = d.Elem()
		}
		if d.Kind() != reflect.Struct {
			return fmt.Errorf("%T: dispatcher %d is a %s", ep, i, d.Kind())
		}
		stopFD := d.FieldByName("StopFD")
		if !stopFD.IsValid() || stopFD.Kind() != reflect.Struct {
			return fmt.Errorf("%T: dispatcher %s has no StopFD", ep, d.Type())
		}
		efd := stopFD.FieldByName("EFD")
		if !efd.IsValid() || efd.Kind() != reflect.Int {
			return fmt.Errorf("%T: %s.StopFD has no EFD int", ep, d.Type())
		}
		fds = append(fds, int(efd.Int()))
	}
	for _, fd := range fds {
		if fd < 0 {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		if err != nil {
			return fmt.Errorf("check dispatcher eventfd %d: %w", fd, err)
		}
		if target != "anon_inode:[eventfd]" {
			return fmt.Errorf("dispatcher fd %d is %q, not an eventfd; not closing it", fd, target)
		}
		unix.Close(fd)
	}
	return nil
}
