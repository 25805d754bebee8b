// Package bench turns the output of real benchmark tools (iperf3, sockperf,
// hey) and of /proc into numbers, summarizes repetitions with medians and
// compares tunmesh with the kernel path and an HAProxy mTLS sidecar pair
// against the targets of issue #8. It runs nothing: tools/cmd/tunmesh-bench
// drives the cluster and feeds this package; everything here is pure and
// table-tested on captured tool output.
package bench
