package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/cni/install"
)

func TestParseFlags(t *testing.T) {
	cfg, level, exit, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want := install.Config{
		BinSource: "/opt/tunmesh/bin/tunmesh-cni",
		BinDir:    "/host/opt/cni/bin",
		ConfDir:   "/host/etc/cni/net.d",
		PluginConfig: install.PluginConfig{
			Socket:  "/var/run/tunmesh/cni.sock",
			Timeout: "10s",
		},
	}
	if !sameConfig(cfg, want) || level != slog.LevelInfo || exit.uninstall != uninstallAlways {
		t.Fatalf("defaults = %+v %v %+v, want %+v", cfg, level, exit, want)
	}
	if _, err := install.New(cfg); err != nil {
		t.Fatalf("defaults rejected: %v", err)
	}

	cfg, level, exit, err = parseFlags([]string{
		"-bin-source=/a/tunmesh-cni", "-bin-dir=/b", "-conf-dir=/c", "-socket=/run/s.sock",
		"-timeout=3s", "-fail-open", "-log-file=/var/log/x.log", "-keep-on-exit",
		"-resync-interval=10s", "-log-level=debug", "-uninstall-on-exit=daemonset-deleted", "-pod-name=p", "-pod-namespace=tunmesh",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want = install.Config{
		BinSource: "/a/tunmesh-cni", BinDir: "/b", ConfDir: "/c",
		PluginConfig:   install.PluginConfig{Socket: "/run/s.sock", Timeout: "3s", FailOpen: true, LogFile: "/var/log/x.log"},
		KeepOnExit:     true,
		ResyncInterval: 10 * time.Second,
	}
	if !sameConfig(cfg, want) || level != slog.LevelDebug || exit != (exitOptions{uninstall: uninstallDaemonSetDeleted, podName: "p", podNamespace: "tunmesh"}) {
		t.Fatalf("parsed = %+v %v %+v, want %+v", cfg, level, exit, want)
	}

	t.Setenv("POD_NAME", "")
	for _, args := range [][]string{{"-nope"}, {"extra"}, {"-log-level=loud"}, {"-uninstall-on-exit=sometimes"}, {"-uninstall-on-exit=daemonset-deleted", "-pod-namespace=x"}} {
		if _, _, _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded", args)
		}
	}
}

func TestNewRejectsBadPluginConfig(t *testing.T) {
	cfg, _, _, err := parseFlags([]string{"-timeout=forever"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := install.New(cfg); err == nil {
		t.Fatal("New accepted timeout \"forever\"")
	}
}

// buildInstaller builds this command into a temporary directory.
func buildInstaller(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping binary build in -short mode")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "tunmesh-cni-install")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestSIGTERM runs the installer binary as the DaemonSet does and stops it
// as the kubelet does: on SIGTERM it takes tunmesh-cni out of the conflist
// (back to the primary's bytes) and removes the binary, then exits 0;
// with -keep-on-exit (upgrades) it leaves both in place.
func TestSIGTERM(t *testing.T) {
	bin := buildInstaller(t)
	primary, err := os.ReadFile("../../install/testdata/primary/shipped/10-kindnet.conflist")
	if err != nil {
		t.Fatal(err)
	}
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep-on-exit=%v", keep), func(t *testing.T) {
			dir := t.TempDir()
			src, binDir, confDir := filepath.Join(dir, "src", "tunmesh-cni"), filepath.Join(dir, "bin"), filepath.Join(dir, "net.d")
			for _, d := range []string{filepath.Dir(src), confDir} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(src, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			conflist := filepath.Join(confDir, "10-kindnet.conflist")
			if err := os.WriteFile(conflist, primary, 0o644); err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			cmd := exec.Command(bin, "-bin-source", src, "-bin-dir", binDir, "-conf-dir", confDir,
				"-keep-on-exit="+strconv.FormatBool(keep))
			cmd.Stdout, cmd.Stderr = &logs, &logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			t.Cleanup(func() {
				_ = cmd.Process.Kill()
				<-done
			})
			deadline := time.Now().Add(10 * time.Second)
			for {
				data, _ := os.ReadFile(conflist)
				_, errBin := os.Stat(filepath.Join(binDir, "tunmesh-cni"))
				if bytes.Contains(data, []byte(`"tunmesh-cni"`)) && errBin == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("not installed after 10s:\n%s\nlogs:\n%s", data, logs.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				done <- err // for the cleanup
				if err != nil {
					t.Fatalf("exit after SIGTERM: %v\nlogs:\n%s", err, logs.String())
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("still running 10s after SIGTERM\nlogs:\n%s", logs.String())
			}
			data, _ := os.ReadFile(conflist)
			_, errBin := os.Stat(filepath.Join(binDir, "tunmesh-cni"))
			if keep {
				if !bytes.Contains(data, []byte(`"tunmesh-cni"`)) || errBin != nil {
					t.Errorf("-keep-on-exit: entry kept %v, binary: %v", bytes.Contains(data, []byte(`"tunmesh-cni"`)), errBin)
				}
				return
			}
			if !bytes.Equal(data, primary) {
				t.Errorf("conflist after SIGTERM:\n%s\nwant the primary's bytes:\n%s", data, primary)
			}
			if !errors.Is(errBin, fs.ErrNotExist) {
				t.Errorf("plugin binary after SIGTERM: %v, want gone", errBin)
			}
		})
	}
}

// sameConfig compares the flag-set fields of two Configs (Keep is a func).
func sameConfig(a, b install.Config) bool {
	a.Keep, b.Keep = nil, nil
	return reflect.DeepEqual(a, b)
}
