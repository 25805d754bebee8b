package flowlog

import (
	"cmp"
	"slices"
	"time"
)

// Edge is a pair of endpoints that talked, as `tunmeshctl edges` shows it.
type Edge struct {
	Src      PodRef `json:"src"`
	Dst      PodRef `json:"dst"`
	SrcAddr  string `json:"srcAddr,omitempty"` // when Src is not a known pod
	DstAddr  string `json:"dstAddr,omitempty"`
	Proxy    string `json:"proxy"`
	TLS      string `json:"tls"`
	ClientID string `json:"clientId,omitempty"`
	ServerID string `json:"serverId,omitempty"`
	// Conns counts the connections behind the edge, Open those open now.
	Conns int       `json:"conns"`
	Open  int       `json:"open"`
	Last  time.Time `json:"last"`
}

// Edges groups the connections of Conns by endpoints (pods, or addresses
// when not pods), tls and identities. Meshed connections count on the
// client's side only (the server's agent sees each one too).
func (l *Log) Edges() []Edge {
	type key struct {
		src, dst           PodRef
		srcAddr, dstAddr   string
		proxy, tls, cl, sv string
	}
	m := map[key]*Edge{}
	for _, c := range l.Conns() {
		if c.TLS == TLSTrue && c.Proxy == In {
			continue
		}
		k := key{src: c.SrcPod, dst: c.DstPod, proxy: c.Proxy, tls: c.TLS, cl: c.ClientID, sv: c.ServerID}
		if c.SrcPod.Name == "" {
			k.srcAddr = c.Src.Addr().String()
		}
		if c.DstPod.Name == "" {
			k.dstAddr = c.Dst.String()
		}
		e := m[k]
		if e == nil {
			e = &Edge{Src: c.SrcPod, Dst: c.DstPod, SrcAddr: k.srcAddr, DstAddr: k.dstAddr, Proxy: c.Proxy, TLS: c.TLS, ClientID: c.ClientID, ServerID: c.ServerID}
			m[k] = e
		}
		e.Conns += max(1, c.Count)
		last := c.Opened
		if c.Closed.IsZero() {
			if c.TLS == TLSTrue {
				e.Open++
			}
		} else {
			last = c.Closed
		}
		if last.After(e.Last) {
			e.Last = last
		}
	}
	out := make([]Edge, 0, len(m))
	for _, e := range m {
		out = append(out, *e)
	}
	slices.SortFunc(out, func(a, b Edge) int {
		return cmp.Or(cmp.Compare(a.Src.Namespace, b.Src.Namespace), cmp.Compare(a.Src.Name, b.Src.Name), cmp.Compare(a.SrcAddr, b.SrcAddr),
			cmp.Compare(a.Dst.Namespace, b.Dst.Namespace), cmp.Compare(a.Dst.Name, b.Dst.Name), cmp.Compare(a.DstAddr, b.DstAddr), cmp.Compare(a.TLS, b.TLS))
	})
	return out
}
