// Package netstack is the agent's userspace network stack: one gVisor tcpip
// stack per node (IPv4 and IPv6, TCP only), one NIC per pod TUN device
// (tm0), a TCP forwarder that hands every new flow from a pod to a
// FlowHandler, spoofed-source dials into a pod's NIC, and a flow-ownership
// filter that passes everything the stack does not own to the host network
// stack untouched. It knows nothing of Kubernetes or TLS; the TUN devices
// themselves are made by package tun.
//
// # Packet path from a pod
//
// Every packet the pod's kernel routes into tm0 is read by the NIC's TUN
// endpoint (tunlink.go) and classified, on the reader goroutine, by the
// NIC's link endpoint wrapper (link.go) before gVisor's IP layer sees it:
//
//  1. Source check: a source that is not one of the pod's addresses is
//     dropped and counted (NICStats.SpoofedDrops). Identity therefore comes
//     from the NIC, never from the packet.
//  2. Owned TCP: if gVisor has an endpoint for the 4-tuple on this NIC (a
//     terminated flow, a flow opened by DialTCP, or one still closing), the
//     packet goes into gVisor.
//  3. New TCP: a pure SYN (no ACK) of a flow not already passed through goes
//     into gVisor, where the TCP forwarder asks FlowHandler.HandleFlow. A
//     copy of the SYN is kept until the decision.
//  4. Everything else goes to Options.Passthrough unchanged: packets of
//     passthrough flows, replies of connections that entered the pod through
//     its primary interface (for example kubelet probes or plaintext from
//     unmeshed peers), UDP, ICMP, fragments.
//
// # Ownership
//
// gVisor's transport demuxer is the one source of truth for "owned": the
// stack registers an endpoint there before it sends anything for the flow
// (the forwarder before the SYN-ACK, a connect before the SYN), and removes
// it when the connection is gone, TIME_WAIT included. So the race of a
// pod's SYN-ACK arriving before the dialer recorded its flow cannot happen,
// and there is no second table to keep in step with gVisor's endpoint
// lifetimes. The classifier's demuxer lookup is per NIC, so one pod cannot
// feed packets into another pod's flows.
//
// # Offloads
//
// tm0 is opened with IFF_VNET_HDR and TUNSETOFFLOAD (CSUM, TSO4, TSO6; see
// package tun). The pod's kernel then hands over TCP super-packets of up to
// 64 KiB with partial checksums, one read each, and gVisor's TCP (told the
// link does host GSO) writes up to 64 KiB per packet with a partial checksum,
// which the pod's kernel takes as one skb. A super-packet is classified once,
// as a whole: the reader's virtio header is validated against the packet
// (checkOffload: TCP of the right IP version, neither SYN nor RST, checksum
// where TCP's is), so all its segments share the 4-tuple and the flags that
// matter, and every decision above is the one each segment would get.
// Anything else with an offload header is dropped (a pod with CAP_NET_RAW can
// write arbitrary headers through a packet socket). Owned super-packets go
// into gVisor whole (a large segment; checksums are not checked, as before).
// Passed through ones go to the host TUN whole with their header when it is in
// offload mode too (OffloadWriter; the host kernel segments them where it
// forwards them), or are cut into the segments the pod's kernel would have
// sent, with complete checksums (segmentTCP). SYNs get complete checksums
// before their MSS is clamped.
//
// Both framings are served: a tm0 made by an agent before offloads is
// re-opened with them in place by tun.OpenInNetns, and a fd without
// IFF_VNET_HDR still works packet by packet. Releasing a NIC turns the
// device's offloads off again, so an older agent after a rollback reads
// complete packets.
//
// # Passthrough
//
// A Passthrough decision records the 4-tuple in the NIC's flow table, frees
// the forwarder request without a RST, and writes the kept SYN to the host;
// SYN retransmissions and later packets then go straight to the host without
// asking the handler again. A pure SYN after the pod sent FIN or RST on that
// 4-tuple is a new connection and is decided again; idle entries expire
// (Options.FlowIdleTimeout). Forgetting an entry is harmless for non-SYN
// packets: they are not owned, so they pass through anyway.
//
// The host side is a TUN in the node's namespace, made by the caller (rp_filter
// off on it, forwarding on): writing a packet to it injects it into the
// node's routing as if the pod had sent it there. Passthrough is
// one-directional: the remote answers the pod's address, which the node
// routes to the pod's primary interface, exactly as without the mesh.
//
// # MSS clamping
//
// tm0's MTU is large because it ends in this process (that is what makes
// the terminated path fast), so the pod advertises a large MSS. For
// passthrough SYN and SYN-ACK segments the MSS option is lowered to
// Options.UnderlayMTU minus 40 (IPv4) or 60 (IPv6), and the TCP checksum is
// fixed incrementally (RFC 1624), so nothing else in the packet changes and
// a correct checksum stays correct. Segments without an MSS option are left
// alone.
//
// # Goroutines and fds
//
// The Stack owns: the flow-expiry goroutine (routineExpireFlows), one TUN
// reader goroutine per NIC (routineReadTUN, parked in Go's netpoller while
// the pod is idle: no OS thread per pod, and no read buffer either; stopped
// by DetachNIC/Close through a read deadline, and waited for), gVisor's TCP
// protocol goroutines (stopped by Close), each NIC's TUN fd and the
// duplicate of it that the endpoint reads and writes through an *os.File
// (both closed in DetachNIC/Close). HandleFlow and ServeConn run on the
// goroutine gVisor's forwarder starts per SYN; Close waits for them.
//
// Cost, measured with BenchmarkIdleCost (go test -run '^$' -bench IdleCost
// -benchtime 1x ./netstack/): per attached pod about 13 KiB of heap, one
// parked goroutine and no OS thread; per idle terminated connection about
// 6 KiB of heap (gVisor's endpoint, plus the test's client socket) and the
// handler's goroutine. With fdbased it was about 92 KiB and one thread per
// pod.
//
// # Known limits
//
//   - IPv6 packets with extension headers other than a fragment header, and
//     fragmented TCP, are passed through, never terminated (Linux sends
//     neither for ordinary TCP).
//   - A TUN gives one packet per read (no recvmmsg); offloads make that
//     packet up to 64 KiB. GRO (coalescing several reads into one segment
//     for gVisor) is not done: at tm0's default MTU the pod's packets are
//     already that large.
//   - An agent of this version that is killed leaves offloads on its
//     devices; an older agent started after it (a rollback) would then read
//     super-packets without headers. A clean stop clears them.
//   - A TUN fd holds a reference on its network namespace: the pod's
//     namespace lives on until DetachNIC, so the agent must detach on CNI
//     DEL.
package netstack
