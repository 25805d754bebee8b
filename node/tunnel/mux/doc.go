// Package mux is version 3 of the mesh tunnel: many pod connections
// (streams) over one long-lived mTLS connection between two agents, with
// per-stream flow control. Version 2 (package tunnel: one TLS connection
// per pod connection) stays for peers that do not offer it.
//
// A client offers ALPN "tunmesh/3"; a server that selects it speaks this
// framing for the whole connection. The TLS handshake proves the same
// identities as in version 2 (client certificate = the source pods'
// identity, SNI and server certificate = the destination pods' identity),
// so a connection carries only streams between that pair of identities:
// the dialer pools connections per (source identity, destination node,
// destination identity), and the server checks every stream's header
// against the connection's identities exactly as it checks a version 2
// tunnel.
//
// # Frames
//
// Every frame is an 8-byte header and a payload. Integers are big-endian.
//
//	 0               1               2               3
//	+---------------+---------------+-------------------------------+
//	|     type      |   flags (0)   |        payload length         |
//	+---------------+---------------+-------------------------------+
//	|                        stream id (uint32)                     |
//	+---------------------------------------------------------------+
//
//	Data   0x00  stream's bytes, 1..16384
//	End    0x01  clean end of the sender's direction (a FIN), empty
//	Reset  0x02  the stream was cut (a RST) both ways, empty
//	Window 0x03  uint32 increment of the receiver's window; stream 0: the
//	             connection's
//	Open   0x04  client -> server: opens stream id (odd, above every id
//	             opened before) with the tunnel header (tunnel.Header wire
//	             form), 1..512 bytes
//	Reply  0x05  server -> client, the stream's first frame: ReplyOK, or
//	             ReplyRefused and a tunnel.Reason; a refused stream is over
//
// A client sends Open and then Data at once, without waiting for the
// Reply: the header travels with the first bytes (the Open is corked until
// the stream's first write, or its first read for a protocol where the
// server speaks first) and costs no round trip.
// The server holds those bytes (within the initial window) until its checks
// pass and the destination pod is dialled, then replies; a refusal drops
// them and reaches the client's reader as a *tunnel.RefusedError, which the
// agent turns into a reset of the pod's connection.
//
// # Flow control
//
// Each stream may have StreamWindow (4 MiB) unacknowledged bytes in
// flight, each connection ConnWindow (16 MiB). Before the server's ReplyOK
// the client's direction of a stream has only InitialStreamWindow (64
// KiB); the ReplyOK grants the rest, without a Window frame. A receiver grants window
// back as its reader consumes (a Window frame once a quarter of a window is
// due), so a stream whose pod does not read stops at its own window and
// the other streams of the connection go on: no head-of-line blocking.
// Sending past a window is a protocol error.
//
// # Ends
//
// End and Reset keep version 2's fail-closed meaning: a clean end is an
// End; anything else the reader sees (a Reset, a refusal, the connection
// breaking: ErrConnLost, which wraps io.ErrUnexpectedEOF) is an error and
// reaches the pod as a reset, never as a clean end. A frame the parser
// does not accept (unknown type, flags set, a length out of bounds, a
// stream never opened, data past a window or after an End) is a protocol
// error: the connection is closed and every stream on it is cut. Frames
// for a stream that already ended on the receiving side (a Reset crossing
// a Refusal) are not errors and are dropped.
//
// # Writes
//
// Writers queue frames in one queue per connection (segments of up to
// 512 KiB); whoever finds no flush in progress writes the queue, and
// frames queued meanwhile ride in its next write. Small frames of many
// streams (opens, replies, window updates, small messages) thus share TLS
// records, and bulk data leaves in writes as large as a segment (crypto/tls
// cuts them into full 16 KiB records; the agents set
// DynamicRecordSizingDisabled, so it does not start with small ones).
package mux
