package procs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// Policy decides the number of Ps from the agent's CPU use. The zero value
// is not usable: see DefaultPolicy.
type Policy struct {
	// Max is the number of Ps when busy (>= 1).
	Max int
	// Up: one P is saturated when the process used at least this many
	// CPU seconds per second over UpAfter intervals in a row.
	Up      float64
	UpAfter int
	// Down: one P is enough again when the process used less than this
	// over DownAfter intervals in a row (slower than Up on purpose:
	// a busy agent that briefly idles keeps its Ps).
	Down      float64
	DownAfter int
}

// DefaultPolicy is the Governor's policy for a process whose default
// GOMAXPROCS is max. One P runs out at about one CPU second per second
// (syscalls release it, so a saturated P shows a little more).
func DefaultPolicy(max int) Policy {
	return Policy{Max: max, Up: 0.8, UpAfter: 2, Down: 0.5, DownAfter: 8}
}

// Validate reports a policy that cannot work.
func (p Policy) Validate() error {
	switch {
	case p.Max < 1:
		return fmt.Errorf("procs: max %d < 1", p.Max)
	case p.UpAfter < 1 || p.DownAfter < 1:
		return fmt.Errorf("procs: up after %d / down after %d intervals: want >= 1", p.UpAfter, p.DownAfter)
	case !(p.Down > 0 && p.Down < p.Up):
		return fmt.Errorf("procs: down %.2f, up %.2f: want 0 < down < up", p.Down, p.Up)
	}
	return nil
}

// state is what the policy remembers between intervals.
type state struct {
	procs int // current Ps
	above int // intervals in a row at >= Up (while at one P)
	below int // intervals in a row at < Down (while above one P)
}

// next folds one interval's CPU use (CPU seconds per second) into s and
// returns the Ps for the next interval.
func (p Policy) next(s *state, use float64) int {
	if s.procs <= 1 {
		s.below = 0
		if use >= p.Up {
			s.above++
		} else {
			s.above = 0
		}
		if s.above >= p.UpAfter && p.Max > 1 {
			s.above = 0
			s.procs = p.Max
		}
		return s.procs
	}
	s.above = 0
	if use < p.Down {
		s.below++
	} else {
		s.below = 0
	}
	if s.below >= p.DownAfter {
		s.below = 0
		s.procs = 1
	}
	return s.procs
}

// Governor applies a Policy to this process every Interval.
type Governor struct {
	Policy   Policy
	Interval time.Duration
	Log      *slog.Logger
	// OnChange, if set, is called with the new number of Ps (metrics).
	OnChange func(procs int)

	pinned atomic.Int64 // > 0: Pin's fixed number of Ps, applied from the next interval

	// Seams for tests: the process's CPU time, the clock, and setting
	// GOMAXPROCS.
	cpu func() (time.Duration, error)
	now func() time.Time
	set func(int)
}

// Run sets one P, then adjusts every Interval until ctx is done, when it
// restores the Policy's Max. It returns ctx.Err(), or an error when the
// process's CPU time cannot be read (it then leaves GOMAXPROCS at Max).
func (g *Governor) Run(ctx context.Context) error {
	if err := g.Policy.Validate(); err != nil {
		return err
	}
	if g.Interval <= 0 {
		return errors.New("procs: interval must be > 0")
	}
	cpu, now, set := g.cpu, g.now, g.set
	if cpu == nil {
		cpu = processCPU
	}
	if now == nil {
		now = time.Now
	}
	if set == nil {
		set = func(n int) { runtime.GOMAXPROCS(n) }
	}
	lastCPU, err := cpu()
	if err != nil {
		return fmt.Errorf("procs: %w", err)
	}
	lastAt := now()
	s := state{procs: 1}
	g.apply(set, s.procs)
	defer g.apply(set, g.Policy.Max)

	t := time.NewTicker(g.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		c, err := cpu()
		if err != nil {
			return fmt.Errorf("procs: %w", err)
		}
		if pin := int(g.pinned.Load()); pin > 0 {
			// An operator's experiment (Pin): hold it, and start the
			// policy afresh from it when released.
			if s.procs != pin {
				g.apply(set, pin)
			}
			s = state{procs: pin}
			lastCPU, lastAt = c, now()
			continue
		}
		at := now()
		wall := at.Sub(lastAt)
		if wall <= 0 {
			continue
		}
		use := float64(c-lastCPU) / float64(wall)
		lastCPU, lastAt = c, at
		before := s.procs
		if after := g.Policy.next(&s, use); after != before {
			g.apply(set, after)
			if g.Log != nil {
				g.Log.Debug("scheduler resized", "procs", after, "cpu_per_s", strconv.FormatFloat(use, 'f', 2, 64))
			}
		}
	}
}

// Pin holds n Ps (n >= 1) from the next interval on, whatever the load,
// until Pin(0) gives the decision back to the policy. It is for
// experiments on a running agent (the debug endpoint), not configuration.
func (g *Governor) Pin(n int) {
	g.pinned.Store(int64(max(n, 0)))
}

// Pinned is what Pin set (0: the policy decides).
func (g *Governor) Pinned() int { return int(g.pinned.Load()) }

func (g *Governor) apply(set func(int), n int) {
	set(n)
	if g.OnChange != nil {
		g.OnChange(n)
	}
}

// processCPU is the user plus system CPU time of the whole process.
func processCPU() (time.Duration, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// ParseMode parses the --procs flag: "auto" (a Governor), or a fixed
// number of Ps >= 1 (0 is refused: say auto).
func ParseMode(s string) (fixed int, auto bool, err error) {
	if s == "auto" {
		return 0, true, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, false, fmt.Errorf("procs %q: want auto or a number >= 1", s)
	}
	return n, false, nil
}
