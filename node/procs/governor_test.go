package procs

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestPolicyNext(t *testing.T) {
	p := Policy{Max: 4, Up: 0.8, UpAfter: 2, Down: 0.5, DownAfter: 3}
	for _, tc := range []struct {
		name string
		use  []float64
		want []int // Ps after each interval
	}{
		{"idle stays at one", []float64{0, 0.1, 0.3, 0.79}, []int{1, 1, 1, 1}},
		{"saturated twice goes up", []float64{0.9, 0.95}, []int{1, 4}},
		{"a dip resets the up streak", []float64{0.9, 0.7, 0.9, 0.9}, []int{1, 1, 1, 4}},
		{"busy stays up", []float64{0.9, 0.9, 0.6, 0.5, 1.5, 0.55}, []int{1, 4, 4, 4, 4, 4}},
		{"light for DownAfter goes down", []float64{0.9, 0.9, 0.2, 0.1, 0.3}, []int{1, 4, 4, 4, 1}},
		{"a burst resets the down streak", []float64{0.9, 0.9, 0.2, 0.1, 0.6, 0.2, 0.1, 0.3}, []int{1, 4, 4, 4, 4, 4, 4, 1}},
		{"up again after down", []float64{0.9, 0.9, 0, 0, 0, 0.85, 0.85}, []int{1, 4, 4, 4, 1, 1, 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := state{procs: 1}
			var got []int
			for _, u := range tc.use {
				got = append(got, p.next(&s, u))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("use %v: Ps %v, want %v", tc.use, got, tc.want)
			}
		})
	}
	t.Run("max one never moves", func(t *testing.T) {
		p := p
		p.Max = 1
		s := state{procs: 1}
		for range 5 {
			if n := p.next(&s, 2); n != 1 {
				t.Fatalf("Ps %d with Max 1", n)
			}
		}
	})
}

func TestPolicyValidate(t *testing.T) {
	good := DefaultPolicy(2)
	if err := good.Validate(); err != nil {
		t.Fatalf("default policy: %v", err)
	}
	for name, mut := range map[string]func(*Policy){
		"max 0":         func(p *Policy) { p.Max = 0 },
		"up after 0":    func(p *Policy) { p.UpAfter = 0 },
		"down after 0":  func(p *Policy) { p.DownAfter = 0 },
		"down above up": func(p *Policy) { p.Down = p.Up + 0.1 },
		"down 0":        func(p *Policy) { p.Down = 0 },
	} {
		p := good
		mut(&p)
		if err := p.Validate(); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// runScripted runs g with a scripted CPU clock until len(use) intervals
// have passed and returns every value GOMAXPROCS was set to. cpu and now
// are called once at start and once per interval, in that order: interval
// k (from 1) has used use[k-1] CPU seconds per second; at, if set, runs
// just before interval k is measured (at(k)).
func runScripted(t *testing.T, g *Governor, use []float64, at func(k int)) []int {
	t.Helper()
	const step = 100 * time.Millisecond
	var (
		mu    sync.Mutex
		calls int
		cpu   time.Duration
		sets  []int
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g.cpu = func() (time.Duration, error) {
		mu.Lock()
		defer mu.Unlock()
		if calls > 0 && calls <= len(use) {
			cpu += time.Duration(use[calls-1] * float64(step))
		}
		if at != nil {
			at(calls)
		}
		if calls == len(use) {
			cancel()
		}
		calls++
		return cpu, nil
	}
	g.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return time.Unix(0, 0).Add(time.Duration(calls-1) * step)
	}
	g.set = func(n int) { mu.Lock(); sets = append(sets, n); mu.Unlock() }
	if err := g.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	return sets
}

// TestGovernorRun: it starts at one P, goes to Max under load, back to
// one when idle, and restores Max when it stops.
func TestGovernorRun(t *testing.T) {
	g := &Governor{Policy: DefaultPolicy(3), Interval: time.Millisecond}
	sets := runScripted(t, g, []float64{0.2, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1}, nil)
	// start at 1; 0.9 twice -> 3; eight intervals under 0.5 -> 1; stop -> 3.
	if want := []int{1, 3, 1, 3}; !slices.Equal(sets, want) {
		t.Errorf("GOMAXPROCS set to %v, want %v", sets, want)
	}
}

func TestGovernorCPUError(t *testing.T) {
	g := &Governor{Policy: DefaultPolicy(2), Interval: time.Millisecond}
	g.cpu = func() (time.Duration, error) { return 0, errors.New("no rusage") }
	g.set = func(int) { t.Error("GOMAXPROCS changed although CPU time cannot be read") }
	if err := g.Run(context.Background()); err == nil {
		t.Fatal("no error")
	}
}

func TestProcessCPU(t *testing.T) {
	a, err := processCPU()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	b, err := processCPU()
	if err != nil {
		t.Fatal(err)
	}
	if b <= a {
		t.Errorf("CPU time did not grow over 50 ms of spinning: %v then %v", a, b)
	}
}

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in    string
		fixed int
		auto  bool
		err   bool
	}{
		{"auto", 0, true, false},
		{"1", 1, false, false},
		{"8", 8, false, false},
		{"0", 0, false, true},
		{"-1", 0, false, true},
		{"", 0, false, true},
		{"two", 0, false, true},
	} {
		fixed, auto, err := ParseMode(tc.in)
		if (err != nil) != tc.err || fixed != tc.fixed || auto != tc.auto {
			t.Errorf("ParseMode(%q) = %d, %v, %v", tc.in, fixed, auto, err)
		}
	}
}

// TestGovernorPin: a pin overrides the policy from the next interval and,
// released, hands back to it (starting from the pinned Ps).
func TestGovernorPin(t *testing.T) {
	g := &Governor{Policy: DefaultPolicy(4), Interval: time.Millisecond}
	// Idle throughout. Pin 2 before interval 2, release before interval 5;
	// the policy then starts from 2 Ps and goes down after DownAfter idle
	// intervals.
	sets := runScripted(t, g, make([]float64, 5+DefaultPolicy(4).DownAfter+1), func(k int) {
		switch k {
		case 2:
			g.Pin(2)
		case 5:
			g.Pin(0)
		}
	})
	if want := []int{1, 2, 1, 4}; !slices.Equal(sets, want) {
		t.Errorf("GOMAXPROCS set to %v, want %v", sets, want)
	}
}
