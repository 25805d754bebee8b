#!/usr/bin/env bash
# demo.sh: the README's main job. Brings up the local cluster (real etcd,
# kube-apiserver and kube-controller-manager; nodes and pods in network
# namespaces), deploys hello and world on different nodes and shows hello
# calling world across nodes. Re-runnable; `make demo-down` removes it all.
set -euo pipefail
cd "$(dirname "$0")/../.."
ctl=bin/tunmeshctl
k() { bin/kubectl --kubeconfig "$kubeconfig" "$@"; }
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "starting the local cluster"
$ctl dev up
kubeconfig=$($ctl dev kubeconfig)
k get nodes -o wide

step "deploying hello (node-1) and world (node-2)"
k apply -f tools/demo/hello-world.yaml
k -n demo rollout status deployment/world --timeout=120s
k -n demo rollout status deployment/hello --timeout=120s
k -n demo get pods -o wide

hello=$(k -n demo get pod -l app=hello -o jsonpath='{.items[0].metadata.name}')
world_ip=$(k -n demo get pod -l app=world -o jsonpath='{.items[0].status.podIP}')

step "hello calls world across nodes: GET http://$world_ip:8080/"
$ctl dev exec -n demo "$hello" -- bin/tunmesh-workload get "http://$world_ip:8080/" 2>/dev/null

step "the Service's EndpointSlice lists the ready world pod"
k -n demo get endpointslices -l kubernetes.io/service-name=world

step "cluster status"
$ctl dev status
cat <<MSG

The cluster keeps running. Try:
  export KUBECONFIG=$kubeconfig
  bin/kubectl get pods -A -o wide
  bin/tunmeshctl dev exec -n demo $hello -- ip addr
Remove everything with: make demo-down
MSG
