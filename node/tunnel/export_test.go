package tunnel

// SetBeforeIdle installs f between an on-demand copy's last pass and its
// going idle (nil removes it); tests widen the lost wake-up race with it.
func SetBeforeIdle(f func()) { testBeforeIdle = f }
