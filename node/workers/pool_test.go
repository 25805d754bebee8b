package workers

import (
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// waitFor polls try until it holds or max has passed.
func waitFor(t *testing.T, max time.Duration, what string, try func() bool) {
	t.Helper()
	deadline := time.Now().Add(max)
	for !try() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", max, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// noLeak fails the test if goroutines started by it are still running at
// its end (after its own cleanups, which run first).
func noLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		waitFor(t, 5*time.Second, "goroutines to exit", func() bool { return runtime.NumGoroutine() <= before })
	})
}

func TestGoRunsEveryTask(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    Options
		tasks   int
		rounds  int
		maxIdle int // expected idle workers once all is done
	}{
		{"one task", Options{}, 1, 1, 1},
		{"rounds reuse workers", Options{}, 8, 5, 8},
		{"idle bounded", Options{MaxIdle: 3}, 10, 2, 3},
		{"no idle kept", Options{MaxIdle: 1}, 4, 3, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			noLeak(t)
			p := New(tc.opts)
			t.Cleanup(p.Close)
			var mu sync.Mutex
			ran := map[int]int{}
			for r := range tc.rounds {
				// All of a round's tasks run at once, so a round needs
				// tc.tasks workers.
				var started, release sync.WaitGroup
				started.Add(tc.tasks)
				release.Add(1)
				var done sync.WaitGroup
				done.Add(tc.tasks)
				for i := range tc.tasks {
					p.Go(func() {
						defer done.Done()
						mu.Lock()
						ran[r*tc.tasks+i]++
						mu.Unlock()
						started.Done()
						release.Wait()
					})
				}
				started.Wait()
				if st := p.Stats(); st.Busy != tc.tasks || st.Idle != 0 {
					t.Fatalf("round %d while running: %+v, want %d busy, 0 idle", r, st, tc.tasks)
				}
				release.Done()
				done.Wait()
				waitFor(t, 5*time.Second, "workers to park", func() bool { return p.Stats().Busy == 0 })
			}
			if len(ran) != tc.tasks*tc.rounds {
				t.Fatalf("%d distinct tasks ran, want %d", len(ran), tc.tasks*tc.rounds)
			}
			for k, n := range ran {
				if n != 1 {
					t.Fatalf("task %d ran %d times", k, n)
				}
			}
			st := p.Stats()
			if st.Idle != tc.maxIdle || st.Busy != 0 {
				t.Fatalf("after the rounds: %+v, want %d idle, 0 busy", st, tc.maxIdle)
			}
			if st.Tasks != uint64(tc.tasks*tc.rounds) {
				t.Fatalf("Tasks = %d, want %d", st.Tasks, tc.tasks*tc.rounds)
			}
			// The first round starts tc.tasks workers; each later round
			// starts only those that were not kept idle.
			want := uint64(tc.tasks + (tc.rounds-1)*(tc.tasks-min(tc.tasks, tc.maxIdle)))
			if st.Started != want {
				t.Fatalf("Started = %d, want %d", st.Started, want)
			}
		})
	}
}

func TestSequentialTasksShareOneWorker(t *testing.T) {
	noLeak(t)
	p := New(Options{})
	t.Cleanup(p.Close)
	for i := range 100 {
		done := make(chan struct{})
		p.Go(func() { close(done) })
		<-done
		waitFor(t, 5*time.Second, "the worker to park", func() bool { return p.Stats().Idle == 1 })
		if st := p.Stats(); st.Started != 1 {
			t.Fatalf("task %d: %d workers started, want 1", i, st.Started)
		}
	}
}

func TestIdleWorkerExitsAfterIdleTimeout(t *testing.T) {
	noLeak(t)
	p := New(Options{IdleTimeout: 20 * time.Millisecond})
	t.Cleanup(p.Close)
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	wg.Add(3)
	release := make(chan struct{})
	for range 3 {
		p.Go(func() { <-release; wg.Done() })
	}
	close(release)
	wg.Wait()
	waitFor(t, 5*time.Second, "idle workers to time out", func() bool {
		st := p.Stats()
		return st.Idle == 0 && st.Busy == 0 && runtime.NumGoroutine() <= base
	})
	// The pool still works after its workers left.
	done := make(chan struct{})
	p.Go(func() { close(done) })
	<-done
	if st := p.Stats(); st.Started != 4 {
		t.Fatalf("Started = %d, want 4", st.Started)
	}
}

func TestCloseStopsIdleAndWaitsForBusy(t *testing.T) {
	noLeak(t)
	p := New(Options{})
	idleDone := make(chan struct{})
	p.Go(func() { close(idleDone) })
	<-idleDone
	waitFor(t, 5*time.Second, "the first worker to park", func() bool { return p.Stats().Idle == 1 })
	release := make(chan struct{})
	running := make(chan struct{})
	p.Go(func() { close(running); <-release })
	<-running
	p.Go(func() {}) // starts a second worker, which parks
	waitFor(t, 5*time.Second, "one worker idle, one busy", func() bool {
		st := p.Stats()
		return st.Idle == 1 && st.Busy == 1
	})

	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a task was running")
	case <-time.After(50 * time.Millisecond):
	}
	if st := p.Stats(); st.Idle != 0 {
		t.Fatalf("after Close began: %d idle workers, want 0", st.Idle)
	}
	close(release)
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return after the task ended")
	}
	if st := p.Stats(); st.Busy != 0 || st.Idle != 0 {
		t.Fatalf("after Close: %+v", st)
	}

	// After Close a task still runs, on a goroutine of its own.
	done := make(chan struct{})
	p.Go(func() { close(done) })
	<-done
	if st := p.Stats(); st.Started != 2 || st.Tasks != 3 {
		t.Fatalf("after Close, Go used the pool: %+v", st)
	}
	p.Close() // idempotent
}

// TestIdleTimeoutRacesWithGo runs tasks while idle workers time out all
// the time, so that a worker is taken off the idle list just as its
// timer fires (run it with -race).
func TestIdleTimeoutRacesWithGo(t *testing.T) {
	noLeak(t)
	p := New(Options{MaxIdle: 4, IdleTimeout: 50 * time.Microsecond})
	t.Cleanup(p.Close)
	var wg sync.WaitGroup
	var mu sync.Mutex
	n := 0
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				var one sync.WaitGroup
				one.Add(1)
				p.Go(func() {
					mu.Lock()
					n++
					mu.Unlock()
					one.Done()
				})
				one.Wait()
				if (g+i)%7 == 0 {
					time.Sleep(time.Duration(i%3) * 30 * time.Microsecond)
				}
			}
		}()
	}
	wg.Wait()
	if n != 2000 {
		t.Fatalf("%d tasks ran, want 2000", n)
	}
	waitFor(t, 5*time.Second, "the last workers to park", func() bool { return p.Stats().Busy == 0 })
	if st := p.Stats(); st.Tasks != 2000 || st.Idle > 4 {
		t.Fatalf("Stats = %+v", st)
	}
}

const panicEnv = "TUNMESH_WORKERS_PANIC_CHILD"

// TestPanicIsNotRecovered checks that a panicking task ends the process
// as it would in a plain goroutine, with the task in the trace.
func TestPanicIsNotRecovered(t *testing.T) {
	if os.Getenv(panicEnv) == "1" {
		p := New(Options{})
		done := make(chan struct{})
		p.Go(func() { close(done) })
		<-done
		p.Go(panickingTask) // on the reused worker
		time.Sleep(5 * time.Second)
		os.Exit(0) // not reached when the panic ends the process
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPanicIsNotRecovered$")
	cmd.Env = append(os.Environ(), panicEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the child survived a panicking task:\n%s", out)
	}
	for _, want := range []string{"panic: task failed on purpose", "panickingTask"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("child output lacks %q:\n%s", want, out)
		}
	}
}

func panickingTask() { panic("task failed on purpose") }
