// Package deploy holds tunmesh's Kubernetes manifests, embedded so that
// tools (the local cluster, tunmeshctl install) apply exactly the files
// users read here.
package deploy

import "embed"

// Manifests are the YAML files of this folder.
//
//go:embed *.yaml
var Manifests embed.FS

// Base lists, in apply order, the manifests every installation needs
// before its workloads: namespace, RBAC and ServiceAccounts.
var Base = []string{"namespace.yaml", "identity-rbac.yaml", "node-rbac.yaml"}
