#!/usr/bin/env bash
# demo.sh: the README's main job. Brings up the local cluster on real nodes
# (every node a real kubelet with containerd and runc, tunmesh's images
# from `make images` imported), installs tunmesh the way a user does
# (`tunmeshctl install | kubectl apply -f -`), deploys hello and world on
# different nodes and shows hello calling world through the mesh: the
# request, the connection with both identities (from kubectl logs of the
# agents), a capture of the underlay with nothing but TLS, tunmeshctl check
# and kubectl logs. Re-runnable; `make demo-down` removes it all.
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

# agent_logs prints both agents' logs: kubectl logs of the DaemonSet pods,
# or the log files of the agents the cluster runs.
agent_logs() {
	if [ "$real" = 1 ]; then
		for node in node-1 node-2; do
			agent=$(k -n tunmesh get pod -l app=tunmesh-node --field-selector spec.nodeName=$node -o jsonpath='{.items[0].metadata.name}')
			k -n tunmesh logs "$agent" -c agent
		done
	else
		cat "$root/logs/tunmesh-node-node-1.log" "$root/logs/tunmesh-node-node-2.log"
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

step "the connection, as the agents saw it"
sleep 1
logs=$(mktemp /tmp/tunmesh-demo.XXXX.log)
agent_logs >"$logs"
python3 - "$logs" <<'PY'
import json, sys
last = {}
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("msg") == "connection closed":
        last[r.get("direction")] = r
for r in last.values():
    who = r.get("src_pod") or r.get("dst_pod") or "?"
    state = "SECURED" if r.get("tls") else "PLAINTEXT"
    print(f"  {r.get('direction', '?'):8} {who:32} {state}  client={r.get('client_id')}  server={r.get('server_id')}")
PY
rm -f "$logs"

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
