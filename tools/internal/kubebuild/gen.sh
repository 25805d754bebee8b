#!/usr/bin/env bash
# gen.sh regenerates the Go module that builds the Kubernetes control-plane
# binaries (kube-apiserver, kube-controller-manager, kubectl) used by the local
# cluster. k8s.io/kubernetes points its staging modules at ./staging/...; a
# consumer must replace each with the published k8s.io/X v0.<minor>.<patch>.
# The files are stored as .txt so that they are embedded into tunmeshctl
# (a directory holding a go.mod would be a separate module and cannot be).
#
# Usage: tools/internal/kubebuild/gen.sh v1.37.2
set -euo pipefail
version=${1:?usage: gen.sh vX.Y.Z}
staging=v0.${version#v1.}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
goline=$(grep -m1 '^go ' "$gomod")

{
	echo "module tunmesh.local/kubebuild"
	echo
	echo "$goline"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	grep -E '^\s+k8s.io/[a-z0-9-]+ => ./staging/' "$gomod" |
		awk -v v="$staging" '{ print "\t" $1 " => " $1 " " v }'
	echo ")"
} >"$work/go.mod"
cp "$here/mod/tools.go.txt" "$work/tools.go"
(cd "$work" && GOFLAGS=-mod=mod go mod tidy)
cp "$work/go.mod" "$here/mod/go.mod.txt"
cp "$work/go.sum" "$here/mod/go.sum.txt"
echo "$version" >"$here/mod/VERSION"
