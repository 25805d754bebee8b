package policy

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// ErrInvalidPorts is wrapped by every error ParsePorts returns.
var ErrInvalidPorts = errors.New("invalid port list")

// PortSet is an immutable set of TCP ports (1-65535). The zero value is the
// empty set. PortSets are values: copying one is cheap and safe for
// concurrent use, since no method modifies it.
//
// A set is stored as sorted ranges rather than a 64Ki-bit bitmap because the
// agent keeps two per pod and real lists are a handful of ports; a binary
// search over a few ranges costs about as much as a bitmap lookup.
type PortSet struct {
	// ranges are sorted, and no two overlap or touch (a.hi+1 < b.lo), so
	// each set has exactly one representation; Equal and String rely on it.
	ranges []portRange
}

// portRange is the inclusive range lo-hi, lo <= hi.
type portRange struct{ lo, hi uint16 }

// newPortSet sorts and merges rs, which it may reorder in place.
func newPortSet(rs []portRange) PortSet {
	if len(rs) == 0 {
		return PortSet{}
	}
	slices.SortFunc(rs, func(a, b portRange) int { return int(a.lo) - int(b.lo) })
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		// uint32 so that a range ending at 65535 does not wrap to 0.
		if uint32(r.lo) <= uint32(last.hi)+1 {
			last.hi = max(last.hi, r.hi)
			continue
		}
		out = append(out, r)
	}
	return PortSet{ranges: slices.Clip(out)}
}

// Contains reports whether port is in the set. Port 0 never is.
func (s PortSet) Contains(port uint16) bool {
	rs := s.ranges
	// Find the first range that does not end below port; sort.Search by
	// hand, as this sits on the per-flow path.
	i, j := 0, len(rs)
	for i < j {
		m := int(uint(i+j) >> 1)
		if rs[m].hi < port {
			i = m + 1
		} else {
			j = m
		}
	}
	return i < len(rs) && rs[i].lo <= port
}

// Empty reports whether the set has no ports.
func (s PortSet) Empty() bool { return len(s.ranges) == 0 }

// Equal reports whether s and t hold the same ports.
func (s PortSet) Equal(t PortSet) bool { return slices.Equal(s.ranges, t.ranges) }

// String returns the canonical form: ascending ports and ranges, merged
// where they overlap or touch, separated by commas without spaces, e.g.
// "25,8080-8090". The empty set is "". ParsePorts accepts every String.
func (s PortSet) String() string {
	var b []byte
	for i, r := range s.ranges {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendUint(b, uint64(r.lo), 10)
		if r.hi != r.lo {
			b = append(b, '-')
			b = strconv.AppendUint(b, uint64(r.hi), 10)
		}
	}
	return string(b)
}

// ParsePorts parses a comma-separated list of ports and inclusive ranges,
// such as "25, 8080-8090". Duplicates and overlaps are allowed and merged.
//
// The syntax is strict where a mistake would silently change which ports
// bypass the mesh, and lenient only where Linkerd's was, so that Linkerd
// annotations keep working:
//   - A port is decimal digits only (no sign; leading zeros are allowed, as
//     Linkerd's strconv.Atoi allowed them) with a value of 1-65535.
//   - A range is lo-hi with lo <= hi; both bounds are required.
//   - Space around items and around a range's '-' is ignored.
//   - An empty or all-space list is the empty set (an explicit "skip nothing").
//   - One trailing comma is tolerated ("80,443,"), as Linkerd strips one. Any
//     other empty item (",80", "80,,443", "80,,") is an error: it more likely
//     marks a port lost in editing than a style choice.
//
// Errors wrap ErrInvalidPorts and quote the first bad item with its 1-based
// position in the list.
func ParsePorts(s string) (PortSet, error) {
	body := strings.TrimSpace(s)
	if body == "" {
		return PortSet{}, nil
	}
	body = strings.TrimSuffix(body, ",")
	var rs []portRange
	pos := 0
	for item := range strings.SplitSeq(body, ",") {
		pos++
		item = strings.TrimSpace(item)
		r, err := parseItem(item)
		if err != nil {
			return PortSet{}, fmt.Errorf("%w: item %d %q: %v", ErrInvalidPorts, pos, truncate(item), err)
		}
		rs = append(rs, r)
	}
	return newPortSet(rs), nil
}

// parseItem parses one trimmed item: "80" or "80-90".
func parseItem(item string) (portRange, error) {
	if item == "" {
		return portRange{}, errors.New("empty item")
	}
	loS, hiS, isRange := strings.Cut(item, "-")
	if !isRange {
		p, err := parsePort(item)
		return portRange{p, p}, err
	}
	loS, hiS = strings.TrimSpace(loS), strings.TrimSpace(hiS)
	if loS == "" {
		return portRange{}, errors.New("range has no lower bound")
	}
	if hiS == "" {
		return portRange{}, errors.New("range has no upper bound")
	}
	lo, err := parsePort(loS)
	if err != nil {
		return portRange{}, err
	}
	hi, err := parsePort(hiS)
	if err != nil {
		return portRange{}, err
	}
	if lo > hi {
		return portRange{}, fmt.Errorf("range lower bound %d above upper bound %d", lo, hi)
	}
	return portRange{lo, hi}, nil
}

// parsePort parses 1-65535 written as decimal digits only. The digits are
// checked by hand so that the accepted syntax is exactly the documented one
// (strconv.Atoi, which Linkerd used, also takes a sign) and so that errors
// read well in a Kubernetes event.
func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("empty port")
	}
	var n uint32
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q is not a port number", truncate(s))
		}
		// Saturate rather than overflow on long digit strings.
		if n <= 65535 {
			n = n*10 + uint32(c-'0')
		}
	}
	if n == 0 || n > 65535 {
		return 0, fmt.Errorf("port %s out of range 1-65535", truncate(s))
	}
	return uint16(n), nil
}

// truncate keeps error messages, which end up in Kubernetes events, readable
// when an annotation is huge.
func truncate(s string) string {
	const limit = 64
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
