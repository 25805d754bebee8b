package policy

import (
	"errors"
	"strconv"
	"strings"
	"testing"
)

// FuzzParsePorts checks that ParsePorts never panics, that its errors wrap
// ErrInvalidPorts, that it accepts exactly what an independent, naive
// reading of the documented syntax accepts, that String is canonical (it
// reparses to an equal set and is a fixed point), and that Contains agrees
// with the naive reading on the ports where a mistake would show: every
// bound, its neighbours, the ends of the port space and a spread of others.
// Seeds live in testdata/fuzz/FuzzParsePorts.
func FuzzParsePorts(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		set, err := ParsePorts(s)
		naive, naiveOK := naiveParse(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidPorts) {
				t.Fatalf("ParsePorts(%q) error %v does not wrap ErrInvalidPorts", s, err)
			}
			if naiveOK {
				t.Fatalf("ParsePorts(%q) = %v, but the naive parser accepts it", s, err)
			}
			return
		}
		if !naiveOK {
			t.Fatalf("ParsePorts(%q) = %q, but the naive parser rejects it", s, set)
		}
		checkInvariants(t, set)

		str := set.String()
		again, err := ParsePorts(str)
		if err != nil {
			t.Fatalf("ParsePorts(%q).String() = %q does not reparse: %v", s, str, err)
		}
		if !again.Equal(set) || again.String() != str {
			t.Fatalf("round trip of %q: %q -> %q", s, str, again)
		}
		if set.Empty() != (str == "") {
			t.Fatalf("ParsePorts(%q): Empty() = %v, String() = %q", s, set.Empty(), str)
		}

		samples := []uint16{0, 1, 2, 65534, 65535}
		for _, r := range set.ranges {
			samples = append(samples, r.lo-1, r.lo, r.lo+1, r.hi-1, r.hi, r.hi+1)
		}
		for p := uint32(0); p <= 65535; p += 997 { // a prime stride
			samples = append(samples, uint16(p))
		}
		for _, p := range samples {
			if got, want := set.Contains(p), naive[p]; got != want {
				t.Fatalf("ParsePorts(%q).Contains(%d) = %v, naive says %v", s, p, got, want)
			}
		}
	})
}

// checkInvariants checks the representation PortSet relies on.
func checkInvariants(t *testing.T, s PortSet) {
	t.Helper()
	for i, r := range s.ranges {
		if r.lo == 0 || r.lo > r.hi {
			t.Fatalf("range %d of %v is %d-%d", i, s.ranges, r.lo, r.hi)
		}
		if i > 0 && uint32(s.ranges[i-1].hi)+1 >= uint32(r.lo) {
			t.Fatalf("ranges %d and %d of %v overlap or touch", i-1, i, s.ranges)
		}
	}
}

// naiveParse reads the syntax documented on ParsePorts in the most direct
// way, into one bool per port.
func naiveParse(s string) (*[65536]bool, bool) {
	var set [65536]bool
	s = strings.TrimSpace(s)
	if s == "" {
		return &set, true
	}
	s = strings.TrimSuffix(s, ",")
	for _, item := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(item), "-")
		if !isRange {
			hi = lo
		}
		l, ok1 := naivePort(strings.TrimSpace(lo))
		h, ok2 := naivePort(strings.TrimSpace(hi))
		if !ok1 || !ok2 || l > h {
			return nil, false
		}
		for p := l; p <= h; p++ {
			set[p] = true
		}
	}
	return &set, true
}

func naivePort(s string) (int, bool) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, false // digits only: no sign, no spaces inside
	}
	n, err := strconv.ParseUint(s, 10, 16)
	return int(n), err == nil && n >= 1
}
