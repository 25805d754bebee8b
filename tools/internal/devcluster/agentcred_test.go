package devcluster

import (
	"path/filepath"
	"slices"
	"testing"

	"k8s.io/client-go/tools/clientcmd"
)

// TestAgentKubeconfig: an agent acts as tunmesh-node with its node's name
// in the extra the node guard checks, through the admin certificate.
func TestAgentKubeconfig(t *testing.T) {
	dir := t.TempDir()
	m := &mesh{cp: &controlPlane{pki: pki{dir: filepath.Join(dir, "pki")}}}
	path := filepath.Join(dir, "kubeconfig")
	if err := m.agentKubeconfig(path, NodeSpec{Name: "node-2"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ai := cfg.AuthInfos[cfg.Contexts[cfg.CurrentContext].AuthInfo]
	if ai == nil {
		t.Fatalf("no user for the current context in %+v", cfg)
	}
	if ai.Impersonate != "system:serviceaccount:"+meshNS+":tunmesh-node" {
		t.Errorf("impersonates %q", ai.Impersonate)
	}
	if got := ai.ImpersonateUserExtra[NodeNameExtra]; !slices.Equal(got, []string{"node-2"}) {
		t.Errorf("extra %s = %v, want [node-2] (all: %v)", NodeNameExtra, got, ai.ImpersonateUserExtra)
	}
	if ai.ClientCertificate != m.cp.pki.clientCert(adminUser) || cfg.Clusters[cfg.Contexts[cfg.CurrentContext].Cluster].Server != m.cp.apiURL() {
		t.Errorf("cert %s: want the admin certificate and the control plane's API", ai.ClientCertificate)
	}
}
