package main

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/tunmesh/tunmesh/cni/install"
)

func TestParseFlags(t *testing.T) {
	cfg, level, err := parseFlags(nil, io.Discard)
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
	if cfg != want || level != slog.LevelInfo {
		t.Fatalf("defaults = %+v %v, want %+v", cfg, level, want)
	}
	if _, err := install.New(cfg); err != nil {
		t.Fatalf("defaults rejected: %v", err)
	}

	cfg, level, err = parseFlags([]string{
		"-bin-source=/a/tunmesh-cni", "-bin-dir=/b", "-conf-dir=/c", "-socket=/run/s.sock",
		"-timeout=3s", "-fail-open", "-log-file=/var/log/x.log", "-keep-on-exit",
		"-resync-interval=10s", "-log-level=debug",
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
	if cfg != want || level != slog.LevelDebug {
		t.Fatalf("parsed = %+v %v, want %+v", cfg, level, want)
	}

	for _, args := range [][]string{{"-nope"}, {"extra"}, {"-log-level=loud"}} {
		if _, _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded", args)
		}
	}
}

func TestNewRejectsBadPluginConfig(t *testing.T) {
	cfg, _, err := parseFlags([]string{"-timeout=forever"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := install.New(cfg); err == nil {
		t.Fatal("New accepted timeout \"forever\"")
	}
}
