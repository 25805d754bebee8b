package installcli

import (
	"fmt"
	"io"
	"slices"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/tunmesh/tunmesh/deploy"
)

// UninstallObjects returns references (apiVersion, kind, name, namespace)
// to everything install creates, in delete order: the node DaemonSet first
// (its CNI installers take tunmesh-cni out of each node's conflist and
// remove the binary on SIGTERM; running pods keep their connectivity), the
// namespace last.
func UninstallObjects() ([]*unstructured.Unstructured, error) {
	objs, err := deploy.Objects()
	if err != nil {
		return nil, err
	}
	objs = append(objs,
		object("v1", "ConfigMap", deploy.TrustAnchorsName),
		object("v1", "Secret", deploy.IssuerSecretName))
	var refs []*unstructured.Unstructured
	for _, o := range objs {
		r := &unstructured.Unstructured{Object: map[string]any{}}
		r.SetAPIVersion(o.GetAPIVersion())
		r.SetKind(o.GetKind())
		r.SetName(o.GetName())
		if ns := o.GetNamespace(); ns != "" {
			r.SetNamespace(ns)
		}
		refs = append(refs, r)
	}
	// Delete order: workloads (DaemonSet first), then the rest in reverse
	// apply order, so the namespace goes last.
	rank := func(o *unstructured.Unstructured) int {
		switch o.GetKind() {
		case "DaemonSet":
			return 0
		case "Deployment", "PodDisruptionBudget", "Service":
			return 1
		case "Namespace":
			return 3
		}
		return 2
	}
	slices.Reverse(refs)
	slices.SortStableFunc(refs, func(a, b *unstructured.Unstructured) int { return rank(a) - rank(b) })
	return refs, nil
}

// WriteUninstall prints the objects to delete for `| kubectl delete
// --ignore-not-found -f -`.
func WriteUninstall(w io.Writer, format string) error {
	refs, err := UninstallObjects()
	if err != nil {
		return err
	}
	if format == "yaml" {
		if _, err := fmt.Fprint(w, "# tunmesh, to delete: tunmeshctl uninstall | kubectl delete --ignore-not-found -f -\n"+
			"# The DaemonSet goes first: its CNI installers take tunmesh-cni out of every node's\n"+
			"# conflist; running pods keep talking (in plaintext) without a restart.\n"); err != nil {
			return err
		}
	}
	return Write(w, refs, format)
}
