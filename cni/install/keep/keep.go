// Package keep decides, when the CNI installer stops, whether tunmesh is
// being uninstalled or its pod only replaced (install.Config.Keep). It is
// apart from package install so that only the installer command links
// client-go.
package keep

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tunmesh/tunmesh/identity/rbac"
)

// RequiredPermissions are the API calls WhileDaemonSetExists makes for a
// pod in namespace: its own pod, and its DaemonSet.
func RequiredPermissions(namespace string) []rbac.Permission {
	return []rbac.Permission{
		{Resource: "pods", Verb: "get", Namespace: namespace},
		{Group: "apps", Resource: "daemonsets", Verb: "get", Namespace: namespace},
	}
}

// WhileDaemonSetExists decides, when the installer is stopped, whether
// tunmesh is being uninstalled (its DaemonSet deleted or being deleted:
// take tunmesh-cni out) or the pod is only being replaced (a rollout, a
// deleted pod, a node shutting down: keep it, so pods created meanwhile
// wait for the agent instead of starting unmeshed; the next installer pod
// takes over). Anything it cannot tell uninstalls, as without the check.
func WhileDaemonSetExists(client kubernetes.Interface, namespace, pod string) func(context.Context) (bool, string) {
	return func(ctx context.Context) (bool, string) {
		p, err := client.CoreV1().Pods(namespace).Get(ctx, pod, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Sprintf("read own pod %s/%s: %v", namespace, pod, err)
		}
		ref := metav1.GetControllerOf(p)
		if ref == nil || ref.Kind != "DaemonSet" {
			return false, fmt.Sprintf("pod %s/%s is not run by a DaemonSet", namespace, pod)
		}
		ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return false, fmt.Sprintf("DaemonSet %s/%s deleted", namespace, ref.Name)
		case err != nil:
			return false, fmt.Sprintf("read DaemonSet %s/%s: %v", namespace, ref.Name, err)
		case ds.DeletionTimestamp != nil:
			return false, fmt.Sprintf("DaemonSet %s/%s is being deleted", namespace, ref.Name)
		}
		return true, fmt.Sprintf("DaemonSet %s/%s still exists (rollout or replaced pod): its next pod takes over", namespace, ref.Name)
	}
}
