#!/usr/bin/env bash
# demo.sh: the README's main job. Brings up the local cluster on real nodes
# (every node a real kubelet with containerd and runc, tunmesh's images
# from `make images` imported), installs tunmesh the way a user does
# (`tunmeshctl install | kubectl apply -f -`), deploys hello and world on
# different nodes and shows hello calling world through the mesh: the
# request, the connection with both identities (tunmeshctl edges), a short
# tunmeshctl tap, a capture of the underlay with nothing but TLS,
# tunmeshctl check and kubectl logs. Re-runnable; `make demo-down` removes it all.
#
# TUNMESH_DEMO_REAL_NODES=0: the kubelet stand-in instead, with the mesh
# run by the cluster itself (see docs/local-cluster.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
ctl=bin/tunmeshctl
name=${TUNMESH_DEV_NAME:-tmdev}
real=${TUNMESH_DEMO_REAL_NODES:-1}
k() { bin/kubectl --kubeconfig "$kubeconfig" "$@"; }
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ "$real" = 1 ]; then
	step "starting the local cluster (real kubelet + containerd nodes)"
	$ctl dev up --name "$name" --real-nodes
else
	step "starting the local cluster"
	$ctl dev up --name "$name"
fi
kubeconfig=$($ctl dev kubeconfig --name "$name")
root=$(dirname "$kubeconfig")
k get nodes -o wide

if [ "$real" = 1 ]; then
	step "installing tunmesh: tunmeshctl install | kubectl apply -f -"
	start=$(date +%s)
	$ctl install --kubeconfig "$kubeconfig" | k apply -f -
	k -n tunmesh rollout status deployment/tunmesh-identity --timeout=180s
	k -n tunmesh rollout status daemonset/tunmesh-node --timeout=180s
	echo "  installed and ready in $(($(date +%s) - start)) s"
	k -n tunmesh get pods -o wide
fi

# in_hello runs a command in hello: kubectl exec on real nodes, dev exec
# (the pod's network namespace, host binaries) on stand-in nodes.
in_hello() {
	if [ "$real" = 1 ]; then
		k -n demo exec "$hello" -- "$@"
	else
		$ctl dev exec --name "$name" -n demo "$hello" -- "bin/$1" "${@:2}"
	fi
}

step "deploying hello (node-1) and world (node-2)"
k apply -f tools/demo/hello-world.yaml
k -n demo rollout status deployment/world --timeout=120s
k -n demo rollout status deployment/hello --timeout=120s
k -n demo get pods -o wide

hello=$(k -n demo get pod -l app=hello -o jsonpath='{.items[0].metadata.name}')
world_ip=$(k -n demo get svc world -o jsonpath='{.spec.clusterIP}')

step "hello calls world across nodes through its ClusterIP: GET http://$world_ip:8080/"
in_hello tunmesh-workload get "http://$world_ip:8080/" 2>/dev/null

step "the connection, as the agents account for it: tunmeshctl edges and tap"
# A viewer allowed to see edges and tap in demo (docs/observability.md); the
# agents' observability API is on the node addresses, reached from the
# control plane's namespace of the local cluster (--netns).
k apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: ServiceAccount
metadata: {name: demo-viewer, namespace: demo}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: tunmesh-observe, namespace: demo}
rules:
- apiGroups: [tap.tunmesh.io]
  resources: [pods/edges, pods/tap, pods/capture]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: demo-viewer-observe, namespace: demo}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: tunmesh-observe}
subjects:
- {kind: ServiceAccount, name: demo-viewer, namespace: demo}
YAML
obs=(--kubeconfig "$kubeconfig" --agent-token "$(k -n demo create token demo-viewer --audience tunmesh.io/observe)" --netns "$name-cp" -n demo)
$ctl edges "${obs[@]}" -o wide
$ctl tap "${obs[@]}" deploy/world --duration 4s &
tap_pid=$!
sleep 1.5
in_hello tunmesh-workload get "http://$world_ip:8080/" >/dev/null 2>&1
wait $tap_pid || true

step "the underlay (tshark on the nodes' bridge) sees only TLS"
pcap=$(mktemp /tmp/tunmesh-demo.XXXX.pcap)
nsenter --net="/run/netns/$name-ul" -- tshark -q -i br0 -f "tcp port 4143" -w "$pcap" 2>/dev/null &
tshark_pid=$!
sleep 2
in_hello tunmesh-workload get "http://$world_ip:8080/" >/dev/null 2>&1
sleep 1
kill -INT $tshark_pid; wait $tshark_pid 2>/dev/null || true
tshark -r "$pcap" -d tcp.port==4143,tls 2>/dev/null | head -12
if ! tshark -r "$pcap" -d tcp.port==4143,tls -Y tls.app_data 2>/dev/null | grep -q .; then
	echo "  NO TLS on the mesh port: the call was not meshed" >&2
	exit 1
fi
if grep -aq "world says hello back" "$pcap"; then
	echo "  PLAINTEXT FOUND on the underlay" >&2
	exit 1
fi
echo "  (the response text does not appear anywhere in the capture)"
rm -f "$pcap"

step "checks (tunmeshctl check)"
$ctl check --kubeconfig "$kubeconfig"

if [ "$real" = 1 ]; then
	step "kubectl logs works: world's log"
	k -n demo logs deployment/world --tail=3
fi

step "cluster status"
$ctl dev status --name "$name"
if [ "$real" = 1 ]; then
	try="bin/kubectl -n demo exec $hello -- tunmesh-workload get http://$world_ip:8080/"
else
	try="bin/tunmeshctl dev exec -n demo $hello -- bin/tunmesh-workload get http://$world_ip:8080/"
fi
cat <<MSG

The cluster keeps running. Try:
  export KUBECONFIG=$kubeconfig
  bin/kubectl get pods -A -o wide
  $try
  bin/tunmeshctl check
Remove everything with: make demo-down
MSG
