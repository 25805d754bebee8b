#!/usr/bin/env bash
# procs-ab.sh: A/B of the agents' scheduler size (--procs) on one live
# benchmark cluster, in interleaved rounds, so that the machine's drift hits
# every mode alike. Each round sets the mode on both agents through their
# loopback debug endpoint (/debug/procs), then runs the tunmesh path's
# sockperf round trip, iperf3 throughput (with the agents' CPU per GB) and
# hey connections/s, as `make bench` does. Prints every round, then the
# medians per mode.
#
#   bin/tunmesh-bench --name ab --reps 1 --keep      # a cluster with the bench pods
#   tools/scripts/procs-ab.sh ab 5 "1 2 auto"
#   bin/tunmeshctl dev down --name ab
set -euo pipefail
cluster=${1:?usage: procs-ab.sh CLUSTER [ROUNDS] [MODES]}
rounds=${2:-5}
modes=${3:-1 2 auto}
root=${TUNMESH_DEV_ROOT:-/var/lib/tunmesh-dev}
export KUBECONFIG=$root/$cluster/kubeconfig
here=$(cd "$(dirname "$0")/../.." && pwd)
kubectl=$here/bin/kubectl
pod() { "$kubectl" -n tunmesh-bench get pod "$1" -o jsonpath="{$2}"; }
client=/run/netns/$cluster-pod-$(pod tunmesh-client .metadata.uid)
server=$(pod tunmesh-server .status.podIP)
agents=()
for n in 1 2; do agents+=("$(pgrep -f "tunmesh-node .*$root/$cluster/mesh/node-$n/" | head -1)"); done
setmode() {
  for n in 1 2; do
    ip netns exec "$cluster-node-$n" curl -sf -X POST -d "n=$1" http://127.0.0.1:6060/debug/procs >/dev/null
  done
  sleep 1 # the governor applies a pin at its next interval
}
ticks() { local t=0; for p in "${agents[@]}"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
inpod() { nsenter --net="$client" -- "$@"; }
hz=$(getconf CLK_TCK)
out=$(mktemp)
trap 'rm -f "$out"; setmode auto 2>/dev/null || true' EXIT
for r in $(seq 1 "$rounds"); do
  for m in $modes; do
    setmode "$m"
    rr=$(inpod sockperf ping-pong --tcp -i "$server" -p 11111 -m 1024 -t 3 --full-rtt 2>&1 |
      awk '/percentile 50.000/{a=$NF} /percentile 99.000/{b=$NF} END{print a, b}')
    t0=$(ticks)
    bytes=$(inpod iperf3 -c "$server" -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bytes"])')
    t1=$(ticks)
    cps=$(inpod hey -z 3s -c 8 -disable-keepalive "http://$server:8080/" | awk '/Requests\/sec/{print $2}')
    line=$(python3 -c "print('round=$r mode=$m rr_p50=%s rr_p99=%s mb_s=%.0f cpu_s_per_gb=%.2f conn_s=%.0f load=%s' % ('${rr% *}', '${rr#* }', $bytes/3e6, ($t1-$t0)/$hz/($bytes/1e9), $cps, '$(cut -d' ' -f1 /proc/loadavg)'))")
    echo "$line" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    kv = dict(f.split('=') for f in line.split())
    for k in ('rr_p50', 'rr_p99', 'mb_s', 'cpu_s_per_gb', 'conn_s'):
        rows[kv['mode']][k].append(float(kv[k]))
print('\n| mode | RR p50 µs | RR p99 µs | MB/s | agents CPU s/GB | conn/s |')
print('|---|---|---|---|---|---|')
for m, r in rows.items():
    med = {k: statistics.median(v) for k, v in r.items()}
    print(f"| {m} | {med['rr_p50']:.0f} | {med['rr_p99']:.0f} | {med['mb_s']:.0f} | {med['cpu_s_per_gb']:.2f} | {med['conn_s']:.0f} |")
PY
