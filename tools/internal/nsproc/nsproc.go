// Package nsproc starts processes inside a named network namespace (through
// nsenter, which setns(2)s and then execs the command, so the pid is the
// command's own) and stops them with a grace period. The local cluster uses
// it for the control plane and for every container.
package nsproc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// Spec describes a process to start.
type Spec struct {
	Netns string   // named network namespace; empty means the caller's
	Path  string   // executable
	Args  []string // arguments after the executable
	Env   []string // full environment; nil inherits the caller's
	Dir   string   // working directory; empty means the caller's
	Log   string   // file that receives stdout and stderr (appended); empty discards
}

// Process is a started process. A goroutine owned by the Process waits for
// it; Done is closed when it has exited.
type Process struct {
	cmd   *exec.Cmd
	done  chan struct{}
	state *os.ProcessState
}

// Start starts the process in its own process group.
func Start(s Spec) (*Process, error) {
	argv := append([]string{s.Path}, s.Args...)
	if s.Netns != "" {
		argv = append([]string{"nsenter", "--net=" + namedns.Path(s.Netns), "--"}, argv...)
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	cmd := exec.Command(path, argv[1:]...)
	cmd.Env = s.Env
	cmd.Dir = s.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if s.Log != "" {
		f, err := os.OpenFile(s.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open log for %s: %w", s.Path, err)
		}
		defer f.Close() // the child holds its own copy
		cmd.Stdout, cmd.Stderr = f, f
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", s.Path, err)
	}
	p := &Process{cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait() // the exit status is read from ProcessState
		p.state = cmd.ProcessState
		close(p.done)
	}()
	return p, nil
}

// Pid is the process id (and process group id).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitCode is the exit status once Done is closed: the exit code, or 128+n
// when killed by signal n (as shells and Kubernetes report it).
func (p *Process) ExitCode() int {
	<-p.done
	if ws, ok := p.state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return p.state.ExitCode()
}

// Signal sends sig to the process group.
func (p *Process) Signal(sig syscall.Signal) error {
	err := syscall.Kill(-p.Pid(), sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// Stop sends SIGTERM to the process group, waits up to grace, then sends
// SIGKILL and waits for the exit. It returns once the process has exited.
func (p *Process) Stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.Signal(syscall.SIGKILL)
		<-p.done
	}
	// Children that outlived the leader still belong to the group.
	_ = p.Signal(syscall.SIGKILL)
}
