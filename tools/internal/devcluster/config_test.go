package devcluster

import (
	"path/filepath"
	"testing"
)

func TestRealNodesDefaults(t *testing.T) {
	cfg, err := Config{Name: "rk", BinDir: "/opt/tm/bin", RealNodes: true, Mesh: true}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Mesh {
		t.Error("real nodes run no in-process mesh (tunmesh is installed with kubectl apply)")
	}
	if cfg.ImageDir != filepath.Join("/opt/tm/bin", "images") {
		t.Errorf("image dir %q, want next to the binaries", cfg.ImageDir)
	}
	if got := cfg.cgroupPrefix(); got != "tunmesh-rk-" {
		t.Errorf("cgroup prefix %q", got)
	}
	if got := ContainerdSocket(cfg, "node-1"); got != filepath.Join(cfg.Dir(), "nodes/node-1/real/host/run/containerd/containerd.sock") {
		t.Errorf("containerd socket %q", got)
	}
	standIn, err := Config{Name: "rk", BinDir: "/b", Mesh: true}.WithDefaults()
	if err != nil || !standIn.Mesh {
		t.Errorf("stand-in cluster lost its mesh: %+v, %v", standIn, err)
	}
}

// Real nodes get a kubelet identity each (the Node authorizer's form, in
// system:nodes) and kube-scheduler one; every cluster gets the API
// server's kubelet client certificate (the API server flag names it).
func TestRealNodeClients(t *testing.T) {
	nodes := Config{Nodes: 2}.nodeSpecs()
	ids := realNodeClients(Config{RealNodes: true}, nodes)
	want := map[clientIdentity]bool{
		{kubeletClientUser, ""}:                true,
		{schedulerUser, ""}:                    true,
		{"system:node:node-1", "system:nodes"}: true,
		{"system:node:node-2", "system:nodes"}: true,
	}
	if len(ids) != len(want) {
		t.Fatalf("identities %v", ids)
	}
	for _, id := range ids {
		if !want[id] {
			t.Errorf("unexpected identity %v", id)
		}
	}
	if ids := realNodeClients(Config{}, nodes); len(ids) != 1 || ids[0].user != kubeletClientUser {
		t.Errorf("stand-in cluster identities %v, want only the kubelet client", ids)
	}
}
