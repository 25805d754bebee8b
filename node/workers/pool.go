// Package workers runs short tasks on long-lived goroutines whose stacks
// have grown already.
//
// Why: every new meshed connection starts a few short-lived goroutines in
// the agent (gVisor's forwarder goroutine per SYN, a tunnel stream's
// handler, its drainer, the on-demand copier). Each starts with a small
// stack and grows it to what a TLS write or the policy decision needs,
// copying it at every doubling (runtime.newstack -> copystack: 11% of
// each agent's CPU under connection churn, docs/performance.md). A worker
// that has run such a task keeps its grown stack, so the next task runs
// without copying.
//
// Idle memory stays flat: at most MaxIdle workers wait for work, and one
// that has waited IdleTimeout exits. The garbage collector still shrinks
// the stack of a worker that waits (it halves a stack that uses less than
// a quarter of itself), so a worker kept idle for long regrows once; under
// churn that is one copy where a fresh goroutine makes several.
package workers

import (
	"sync"
	"time"
)

// Defaults of Options.
const (
	DefaultMaxIdle     = 64
	DefaultIdleTimeout = 10 * time.Second
)

// Options tune a Pool. Zero values mean the defaults.
type Options struct {
	// MaxIdle is how many workers may wait for work at once; a worker
	// that finishes a task while MaxIdle others wait exits.
	MaxIdle int
	// IdleTimeout is how long a worker waits for its next task before it
	// exits.
	IdleTimeout time.Duration
}

// Stats is a snapshot of a Pool's workers.
type Stats struct {
	Idle    int    // workers waiting for a task
	Busy    int    // workers running a task
	Started uint64 // workers started since New
	Tasks   uint64 // tasks handed to workers since New (Go calls before Close)
}

// Pool is a set of worker goroutines. Its methods are safe for concurrent
// use.
//
// Lifecycle: New -> open -> closed. Go starts a worker when none is idle;
// a worker runs tasks until it has waited IdleTimeout, finds MaxIdle
// others idle, or the Pool is closed. Close stops the idle workers and
// waits for the busy ones to finish their tasks (whose owners stop them).
type Pool struct {
	maxIdle     int
	idleTimeout time.Duration
	workers     sync.WaitGroup // every worker goroutine

	mu      sync.Mutex
	idle    []*worker // last in, first out: the most recent has the warmest stack
	busy    int
	closed  bool
	started uint64
	tasks   uint64
}

// worker is the hand-off point of one idle worker.
type worker struct {
	// task receives the next task; nil tells the worker to exit. Buffered
	// so that Go and Close never wait for the worker to be scheduled.
	task chan func()
}

// New makes a Pool. It starts no goroutine.
func New(opts Options) *Pool {
	if opts.MaxIdle <= 0 {
		opts.MaxIdle = DefaultMaxIdle
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	return &Pool{maxIdle: opts.MaxIdle, idleTimeout: opts.IdleTimeout}
}

// Go runs f on an idle worker, or on a new one when none is idle. It never
// waits. f runs as it would in a goroutine of its own: a panic in f is not
// recovered and ends the process. After Close, f runs in a plain goroutine
// (the pool does not own it).
func (p *Pool) Go(f func()) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		go f()
		return
	}
	p.busy++
	p.tasks++
	if n := len(p.idle); n > 0 {
		w := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		w.task <- f
		return
	}
	p.started++
	p.workers.Add(1)
	p.mu.Unlock()
	go p.routineWork(f)
}

// routineWork is one worker: it runs f, then waits for the next task.
func (p *Pool) routineWork(f func()) {
	defer p.workers.Done()
	w := &worker{task: make(chan func(), 1)}
	var timer *time.Timer
	for f != nil {
		f()
		f = nil // let go of what the task held while waiting
		if !p.park(w) {
			return
		}
		if timer == nil {
			timer = time.NewTimer(p.idleTimeout)
		} else {
			timer.Reset(p.idleTimeout)
		}
		select {
		case f = <-w.task:
			timer.Stop()
		case <-timer.C:
			if p.retire(w) {
				return
			}
			// Go (or Close) took w off the idle list before the timer
			// fired: its task is on the way.
			f = <-w.task
		}
	}
}

// park puts w on the idle list after its task. It reports false when the
// worker should exit instead.
func (p *Pool) park(w *worker) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.busy--
	if p.closed || len(p.idle) >= p.maxIdle {
		return false
	}
	p.idle = append(p.idle, w)
	return true
}

// retire takes w off the idle list after its idle timeout. It reports
// false when w was not there any more (Go or Close took it).
func (p *Pool) retire(w *worker) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, x := range p.idle {
		if x == w {
			// Keep the order: the oldest waiters sit at the bottom and
			// time out first.
			copy(p.idle[i:], p.idle[i+1:])
			p.idle[len(p.idle)-1] = nil
			p.idle = p.idle[:len(p.idle)-1]
			return true
		}
	}
	return false
}

// Stats reports the workers now.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Stats{Idle: len(p.idle), Busy: p.busy, Started: p.started, Tasks: p.tasks}
}

// Close stops the idle workers and waits until every worker has exited:
// the busy ones exit when their tasks return, so the tasks' owners must
// stop them. Close is idempotent.
func (p *Pool) Close() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.closed = true
	p.mu.Unlock()
	for _, w := range idle {
		w.task <- nil
	}
	p.workers.Wait()
}
