package tunnel

import "time"

// SetBeforeIdle installs f between an on-demand copy's last pass and its
// going idle (nil removes it); tests widen the lost wake-up race with it.
func SetBeforeIdle(f func()) { testBeforeIdle = f }

// SetLinger sets how long an on-demand copy lingers (0: it exits at once)
// and returns the previous value.
func SetLinger(d time.Duration) time.Duration {
	old := copyLinger
	copyLinger = d
	return old
}
