// Package procs sizes the agent's Go scheduler (GOMAXPROCS) to its load.
//
// Why: every packet the agent handles crosses goroutines (the TUN reader,
// gVisor's TCP processor, the splice, the tunnel's session reader). With
// several Ps and some idle, each hand-off readies a goroutine and wakes an
// idle thread to run it (a futex wake, often on a CPU that was asleep);
// with one P the readied goroutine runs next on the same thread, without a
// wake-up. A lightly loaded agent is therefore faster per round trip, and
// cheaper per byte, with one P. A busy agent on a big node needs more than
// one core. The Governor runs the agent with one P while one is enough,
// and with all of them (the runtime's default, which follows the
// container's CPU limit) once one P is saturated, with hysteresis so that
// it does not flap.
//
// The measurements behind it are in docs/performance.md.
package procs
