package install

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dirWatcher reports changes to the files of one directory through inotify
// (fsnotify is not a dependency; the few calls it would wrap are here).
//
// Changed receives a value (coalesced: capacity 1) after a file whose name
// could be a CNI config is written and closed, created, renamed into or out
// of the directory, or removed. Gone is closed when the directory itself is
// removed or renamed, or the watch fails: the owner then closes the watcher
// and waits for the directory again.
type dirWatcher struct {
	Changed chan struct{}
	Gone    chan struct{}

	f    *os.File
	wg   sync.WaitGroup
	once sync.Once
}

const watchMask = unix.IN_CLOSE_WRITE | unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM |
	unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// newDirWatcher starts watching dir. A missing dir is an error matching
// fs.ErrNotExist (ENOENT), a file in its place one matching ENOTDIR.
func newDirWatcher(dir string) (*dirWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify init: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, watchMask); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("watch %q: %w", dir, err)
	}
	w := &dirWatcher{
		Changed: make(chan struct{}, 1),
		Gone:    make(chan struct{}),
		// A non-blocking fd goes to the runtime poller, so Close wakes a
		// pending Read.
		f: os.NewFile(uintptr(fd), "inotify:"+dir),
	}
	w.wg.Add(1)
	go w.routineReadEvents()
	return w, nil
}

// Close stops the watch and waits for the reader. It is idempotent.
func (w *dirWatcher) Close() {
	w.once.Do(func() { _ = w.f.Close() })
	w.wg.Wait()
}

// routineReadEvents reads inotify events until the fd is closed or the
// directory goes away.
func (w *dirWatcher) routineReadEvents() {
	defer w.wg.Done()
	defer close(w.Gone)
	buf := make([]byte, 64*1024)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		changed, gone := false, false
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameStart := off + unix.SizeofInotifyEvent
			nameEnd := min(nameStart+int(ev.Len), n)
			name := string(trimNUL(buf[nameStart:nameEnd]))
			off = nameEnd
			switch {
			case ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED|unix.IN_UNMOUNT) != 0:
				gone = true
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				changed = true
			case isConfigName(name):
				changed = true
			}
		}
		if changed {
			select {
			case w.Changed <- struct{}{}:
			default:
			}
		}
		if gone {
			return
		}
	}
}

func trimNUL(b []byte) []byte {
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return b
}
