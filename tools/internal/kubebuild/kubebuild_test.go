package kubebuild

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A binary counts as built only with its own stamp naming the current
// module and the executable bit: adding a command to Commands rebuilds
// that command alone.
func TestBuilt(t *testing.T) {
	bin := t.TempDir()
	write := func(name string, mode os.FileMode, content string) {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("kubelet", 0o755, "elf")
	if built(bin, "kubelet", "s1") {
		t.Error("built without a stamp")
	}
	write(".kubelet.stamp", 0o644, "s1\n")
	if !built(bin, "kubelet", "s1") {
		t.Error("not built with a matching stamp")
	}
	if built(bin, "kubelet", "s2") {
		t.Error("built with another module's stamp")
	}
	if built(bin, "kube-scheduler", "s1") {
		t.Error("another command's stamp counted")
	}
	if err := os.Chmod(filepath.Join(bin, "kubelet"), 0o644); err != nil {
		t.Fatal(err)
	}
	if built(bin, "kubelet", "s1") {
		t.Error("built without the executable bit")
	}
}

func TestCommandsIncludeRealNodeBinaries(t *testing.T) {
	want := map[string]bool{"kube-apiserver": true, "kube-controller-manager": true, "kubectl": true, "kube-scheduler": true, "kubelet": true}
	for _, c := range Commands {
		delete(want, c)
	}
	if len(want) > 0 {
		t.Errorf("Commands lacks %v", want)
	}
	tools, err := mod.ReadFile("mod/tools.go.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range Commands {
		if !strings.Contains(string(tools), `"k8s.io/kubernetes/cmd/`+c+`"`) {
			t.Errorf("tools.go.txt does not pin %s (its dependencies would miss from go.sum)", c)
		}
	}
}
