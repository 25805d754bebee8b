#!/usr/bin/env bash
# deps.sh installs what tunmesh needs on a Debian machine, idempotently:
# Debian packages (reference CNI plugins, etcd, containerd, runc, iproute2,
# tshark, ...), the Go modules, and the Kubernetes binaries (control plane,
# kube-scheduler, kubelet) built from the pinned
# k8s.io/kubernetes module into a cache that survives across runs
# (~/.cache/tunmesh, or $TUNMESH_CACHE). bin/kubectl links the built kubectl.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(
	containernetworking-plugins # bridge + host-local: the local cluster's primary CNI
	etcd-server                 # the local cluster's etcd
	containerd runc             # the container runtime of the local cluster's real nodes
	iproute2 util-linux         # ip, nsenter
	tshark iperf3 openssl curl python3 # checks and tools used inside pods/nodes
	haproxy sockperf hey        # make bench: the sidecar pair, ping-pong latency, HTTP load
	linux-perf                  # make bench: where the proxies' CPU goes
	prometheus                  # e2e/observe: the dashboards' queries against a real Prometheus
	ca-certificates
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v go >/dev/null || { echo "deps: Go is required (expected at /usr/local/go/bin)" >&2; exit 1; }
go mod download
mkdir -p bin
go build -o bin/ ./tools/cmd/tunmeshctl
# make bench --transport wireguard: the wireguard-go reference pair, built
# from the module the agent links (no kernel module, no wireguard-tools).
go build -o bin/wireguard-go golang.zx2c4.com/wireguard
kube_bin=$(bin/tunmeshctl dev kube-build)
ln -sfn "$kube_bin/kubectl" bin/kubectl
echo "deps: ok (kubernetes binaries in $kube_bin)"
