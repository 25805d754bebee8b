package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tunmesh/tunmesh/netstack"
	"github.com/tunmesh/tunmesh/netstack/tun"
	"github.com/tunmesh/tunmesh/node/podnet"
)

// podState is what the agent keeps on the node about a meshed pod, so that
// a restarted agent re-attaches running pods without restarting them (the
// pods' TUNs are persistent).
type podState struct {
	ContainerID string       `json:"containerID"`
	Netns       string       `json:"netns"`
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	Addrs       []netip.Addr `json:"addrs"`
}

func (a *Agent) statePath(containerID string) string {
	return filepath.Join(a.cfg.StateDir, "pods", containerID+".json")
}

func (a *Agent) saveState(p *localPod) error {
	if err := os.MkdirAll(filepath.Join(a.cfg.StateDir, "pods"), 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	b, err := json.Marshal(podState{ContainerID: p.containerID, Netns: p.netns, Namespace: p.namespace, Name: p.name, Addrs: p.addrs})
	if err != nil {
		return err
	}
	path := a.statePath(p.containerID)
	if err := os.WriteFile(path+".tmp", b, 0o600); err != nil {
		return fmt.Errorf("write pod state: %w", err)
	}
	return os.Rename(path+".tmp", path)
}

func (a *Agent) dropState(containerID string) {
	if err := os.Remove(a.statePath(containerID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("remove pod state", "container_id", containerID, "err", err)
	}
}

// restore re-attaches the pods recorded by a previous run of the agent:
// their tm0 is re-opened inside their namespace and attached as a NIC.
// Pods that vanished while the agent was down are cleaned up.
func (a *Agent) restore(ctx context.Context) {
	ents, err := os.ReadDir(filepath.Join(a.cfg.StateDir, "pods"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("read pod state", "err", err)
		}
		return
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(a.cfg.StateDir, "pods", e.Name()))
		var st podState
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err != nil || st.ContainerID == "" {
			a.log.Warn("unreadable pod state, dropped", "file", e.Name(), "err", err)
			_ = os.Remove(filepath.Join(a.cfg.StateDir, "pods", e.Name()))
			continue
		}
		if err := a.reattach(ctx, st); err != nil {
			a.log.Warn("pod not re-attached, cleaned up", "pod", st.Name, "pod_namespace", st.Namespace, "err", err)
			cfg := (&cniAgent{a: a}).podnetConfig(nil)
			_ = podnet.Teardown(st.Netns, cfg)
			a.dropState(st.ContainerID)
		}
	}
}

func (a *Agent) reattach(ctx context.Context, st podState) error {
	if _, err := os.Stat(st.Netns); err != nil {
		return fmt.Errorf("netns gone: %w", err)
	}
	pod, err := a.client.CoreV1().Pods(st.Namespace).Get(ctx, st.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("pod %s/%s is gone", st.Namespace, st.Name)
	}
	if err != nil {
		return fmt.Errorf("get pod: %w", err)
	}
	ns, _ := a.client.CoreV1().Namespaces().Get(ctx, st.Namespace, metav1.GetOptions{})
	pol, _ := a.policy.For(pod, ns)
	fd, err := tun.OpenInNetns(st.Netns, "tm0")
	if err != nil {
		return fmt.Errorf("re-open tm0: %w", err)
	}
	nic, err := a.stack.AttachTUN(netstack.NICConfig{FD: fd, Addrs: st.Addrs, MTU: a.cfg.TUNMTU, Name: st.Namespace + "/" + st.Name})
	if err != nil {
		closeFD(fd)
		return fmt.Errorf("attach: %w", err)
	}
	lp := &localPod{containerID: st.ContainerID, namespace: st.Namespace, name: st.Name, netns: st.Netns,
		addrs: st.Addrs, nic: nic, id: a.identity(st.Namespace, serviceAccount(pod)), policy: pol}
	a.local.add(lp)
	a.certs.Acquire(lp.id)
	a.metrics.pods.Inc()
	a.log.Info("pod re-attached", "pod", st.Name, "pod_namespace", st.Namespace, "nic", nic)
	return nil
}
