// Package tunnel is the framing spoken on the mesh tunnel right after the
// mTLS handshake on port 4143, and the byte splice that follows it.
//
// One TLS connection carries exactly one pod TCP connection. The client agent
// (the node of the source pod) opens it, sends a Header naming the original
// destination and the source pod, and waits for the server agent's one-byte
// reply. The server agent answers only after it has checked the header against
// the client certificate and its policy, so a refusal reaches the client agent
// before the pod's connection is accepted and can be turned into a reset.
// After ReplyOK both agents Splice: every further byte is application data.
//
//	client agent                          server agent
//	tls dial :4143, client cert = src SA
//	WriteHeader(conn, h)           ---->  SetReadDeadline; h, err := ReadHeader(conn)
//	                                      verify identity owns h.Src, policy,
//	                                      dial h.Dst from h.Src into the pod's NIC
//	err := ReadReply(conn)         <----  WriteReply(conn, ReasonNone or the refusal)
//	  *RefusedError: reset the pod
//	Splice(ctx, pod, conn, opts)   <--->  Splice(ctx, conn, pod, opts)
//
// The server replies only once the destination dial has succeeded, so that
// ReasonDialFailed reaches the client and a connection is never accepted for a
// pod that cannot be reached. ReadHeader and ReadReply impose no timeout of
// their own: a peer that completes the handshake and then sends nothing holds
// the read until the caller's deadline on conn, which the caller must set
// (and clear before Splice).
//
// SpliceAsync is Splice without a waiting caller, for the agents: over a
// mux stream (an AsyncDrainer) and a pod's netstack connection (a
// Readable), an idle connection then holds no goroutine at all, and the
// end is reported through a callback.
//
// # Wire format
//
// Header, client -> server, once, the first bytes after the TLS handshake.
// All integers are big-endian.
//
//	 0               1               2               3
//	 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//	+---------------+---------------+---------------+---------------+
//	|      'T'      |      'M'      |      'S'      |      'H'      |  magic
//	+---------------+---------------+---------------+---------------+
//	|  version (1)  |   flags (0)   |      body length (uint16)     |
//	+---------------+---------------+-------------------------------+
//	|  family 4|6   |  destination address (4 or 16 bytes) ...      |
//	+---------------+-----------------------------------------------+
//	|    destination port (uint16)  |  source address (4 or 16) ... |
//	+-------------------------------+-------------------------------+
//
//	body length = 11 for family 4 (1 + 4 + 2 + 4)
//	            = 35 for family 6 (1 + 16 + 2 + 16)
//
// The eight fixed bytes frame the header: a reader rejects a body length above
// MaxBodyLen before reading the body, and reads the body it declared and not
// one byte more. Version 1 defines no flags; every flag bit must be zero. The
// encoding is canonical (one family byte, no options), so a valid header has
// exactly one byte form and the parser can afford to reject everything else.
//
// Reply, server -> client, once, after the server has checked the header:
//
//	accepted:  +------+               refused:  +------+--------+
//	           | 0x01 |                         | 0x02 | reason |
//	           +------+                         +------+--------+
//
// The reason byte is one of the Reason constants and is never zero. A client
// treats reasons it does not know as refusals too (ReadReply returns them in a
// RefusedError), so a newer server can add reasons without breaking older
// clients.
//
// # Validation
//
// Both directions of the header (MarshalBinary and ReadHeader) apply the same
// checks: the destination port is not zero, both addresses are of the same
// family, carry no zone and are not IPv4-mapped IPv6 addresses, and neither is
// unspecified, multicast, limited broadcast, loopback or link-local. The mesh
// only carries traffic between pod addresses; a header naming anything else is
// either a bug or an attempt to make the server agent dial something on its own
// node (its loopback, a cloud metadata address), and no policy check further
// down should be the only thing standing in the way.
package tunnel
