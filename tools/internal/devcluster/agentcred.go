package devcluster

import (
	"fmt"

	"k8s.io/client-go/tools/clientcmd"
)

// NodeNameExtra is the user extra in which the API server names the node
// of the pod a ServiceAccount token is bound to (as a DaemonSet pod's
// token is); deploy/node-guard.yaml admits an agent's Node writes only for
// the node it names.
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// agentKubeconfig writes the kubeconfig of n's agent: tunmesh-node, as
// saKubeconfig, plus the node-name extra that a token bound to its pod on
// n would carry. Impersonation carries no extras of its own, so without it
// the node guard would refuse the agent's annotations.
func (m *mesh) agentKubeconfig(path string, n NodeSpec) error {
	if err := m.saKubeconfig(path, "tunmesh-node"); err != nil {
		return err
	}
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return fmt.Errorf("agent kubeconfig of %s: %w", n.Name, err)
	}
	for _, ai := range cfg.AuthInfos {
		ai.ImpersonateUserExtra = map[string][]string{NodeNameExtra: {n.Name}}
	}
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("agent kubeconfig of %s: %w", n.Name, err)
	}
	return nil
}
