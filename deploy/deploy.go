// Package deploy holds tunmesh's Kubernetes manifests, embedded so that
// tools (the local cluster, tunmeshctl install) apply exactly the files
// users read here. The folder is a kustomize base: kustomization.yaml lists
// the files in apply order.
package deploy

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Manifests are the YAML files of this folder.
//
//go:embed *.yaml
var Manifests embed.FS

// Base lists, in apply order, the manifests every installation needs
// before its workloads: namespace, the Authorization CRD (the agents
// cannot sync without it), RBAC and ServiceAccounts, and the admission
// policy that narrows the agents' node writes to their own Node.
var Base = []string{"namespace.yaml", "authorization-crd.yaml", "identity-rbac.yaml", "node-rbac.yaml", "node-guard.yaml"}

// Namespace is tunmesh's namespace, as the manifests name it.
const Namespace = "tunmesh"

// Names of the objects other code refers to.
const (
	ConfigMapName     = "tunmesh-config"          // settings (config.yaml)
	TrustAnchorsName  = "tunmesh-trust-anchors"   // ConfigMap, key ca.crt (not in the base)
	IssuerSecretName  = "tunmesh-identity-issuer" // Secret, cert-manager layout (not in the base)
	NodeDaemonSetName = "tunmesh-node"
	NodeGuardName     = "tunmesh-node-guard" // ValidatingAdmissionPolicy and its binding (node-guard.yaml)
	IdentityName      = "tunmesh-identity"
)

// Resources returns the files kustomization.yaml lists, in order.
func Resources() ([]string, error) {
	b, err := Manifests.ReadFile("kustomization.yaml")
	if err != nil {
		return nil, err
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("kustomization.yaml: %w", err)
	}
	if len(k.Resources) == 0 {
		return nil, errors.New("kustomization.yaml lists no resources")
	}
	return k.Resources, nil
}

// Objects decodes every object of the base, in apply order.
func Objects() ([]*unstructured.Unstructured, error) {
	files, err := Resources()
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, f := range files {
		b, err := Manifests.ReadFile(f)
		if err != nil {
			return nil, err
		}
		objs, err := Decode(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out = append(out, objs...)
	}
	return out, nil
}

// Decode splits a multi-document YAML (or JSON) stream into objects,
// skipping empty documents.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("decode document %d: %w", len(out)+1, err)
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.GetKind() == "" || u.GetAPIVersion() == "" {
			return nil, fmt.Errorf("document %d has no kind or apiVersion", len(out)+1)
		}
		out = append(out, u)
	}
}
