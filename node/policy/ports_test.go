package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in   string
		want string // canonical String()
	}{
		{"", ""},
		{"   ", ""},
		{"\t\n", ""},
		{"80", "80"},
		{"1", "1"},
		{"65535", "65535"},
		{"1-65535", "1-65535"},
		{"25, 8080-8090", "25,8080-8090"},
		{"  25 ,\t8080 - 8090  ", "25,8080-8090"},
		{"8080-8090,25", "25,8080-8090"},         // sorted
		{"80,80,80", "80"},                       // duplicates
		{"80-90,85-95", "80-95"},                 // overlap
		{"80-90,91-95", "80-95"},                 // touching ranges merge
		{"80,81,82", "80-82"},                    // adjacent ports merge
		{"82,80,81", "80-82"},                    // in any order
		{"80-90,70-100", "70-100"},               // containment
		{"80-80", "80"},                          // degenerate range
		{"100-200,1-50,150-300", "1-50,100-300"}, // partial merges
		{"65534,65535,1", "1,65534-65535"},       // top of the range does not wrap
		{"65535-65535,65535", "65535"},
		{"080", "80"}, // leading zeros, as Linkerd's Atoi accepted
		{"00000000000000443", "443"},
		{"80,", "80"}, // one trailing comma tolerated
		{"80, 443 , ", "80,443"},
		{"4190,4191,", "4190-4191"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.in), func(t *testing.T) {
			got, err := ParsePorts(tt.in)
			if err != nil {
				t.Fatalf("ParsePorts(%q) error: %v", tt.in, err)
			}
			if got.String() != tt.want {
				t.Errorf("ParsePorts(%q) = %q, want %q", tt.in, got.String(), tt.want)
			}
			if got.Empty() != (tt.want == "") {
				t.Errorf("ParsePorts(%q).Empty() = %v", tt.in, got.Empty())
			}
		})
	}
}

func TestParsePortsErrors(t *testing.T) {
	tests := []struct {
		in      string
		wantMsg string // a substring: the quoted bad item and what is wrong
	}{
		{"0", `item 1 "0": port 0 out of range`},
		{"65536", `item 1 "65536": port 65536 out of range`},
		{"99999999999999999999999", "out of range"},
		{"0-80", "port 0 out of range"},
		{"80-65536", "port 65536 out of range"},
		{"80-", `item 1 "80-": range has no upper bound`},
		{"-80", `item 1 "-80": range has no lower bound`},
		{"-", "range has no lower bound"},
		{"a-b", `"a" is not a port number`},
		{"80-b", `"b" is not a port number`},
		{"90-80", "lower bound 90 above upper bound 80"},
		{"1-2-3", `"2-3" is not a port number`},
		{"http", `"http" is not a port number`},
		{"+80", `"+80" is not a port number`},
		{"-0", "range has no lower bound"},
		{"80.5", "not a port number"},
		{"0x50", "not a port number"},
		{"8 0", `"8 0" is not a port number`},
		{"80;443", "not a port number"},
		{"80 443", "not a port number"},
		{"８０", "not a port number"}, // full-width digits
		{",", `item 1 "": empty item`},
		{",80", `item 1 "": empty item`},
		{"80,,443", `item 2 "": empty item`},
		{"80,,", `item 2 "": empty item`}, // only ONE trailing comma is tolerated
		{"80, ,", `item 2 "": empty item`},
		{"25,8080-80", `item 2 "8080-80"`},
		{"1," + strings.Repeat("9", 200), `item 2 "` + strings.Repeat("9", 64) + `..."`},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.in), func(t *testing.T) {
			got, err := ParsePorts(tt.in)
			if err == nil {
				t.Fatalf("ParsePorts(%q) = %q, want error", tt.in, got)
			}
			if !errors.Is(err, ErrInvalidPorts) {
				t.Errorf("error %v does not wrap ErrInvalidPorts", err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantMsg)
			}
			if !got.Empty() {
				t.Errorf("ParsePorts(%q) returned %q with its error, want empty", tt.in, got)
			}
		})
	}
}

func TestPortSetContains(t *testing.T) {
	set := mustParse(t, "1, 25, 80-90, 443, 8080-8090, 65535")
	in := []uint16{1, 25, 80, 85, 90, 443, 8080, 8090, 65535}
	out := []uint16{0, 2, 24, 26, 79, 91, 442, 444, 8079, 8091, 65534}
	for _, p := range in {
		if !set.Contains(p) {
			t.Errorf("%q.Contains(%d) = false, want true", set, p)
		}
	}
	for _, p := range out {
		if set.Contains(p) {
			t.Errorf("%q.Contains(%d) = true, want false", set, p)
		}
	}

	var zero PortSet
	for _, p := range []uint16{0, 1, 80, 65535} {
		if zero.Contains(p) {
			t.Errorf("zero PortSet contains %d", p)
		}
	}
	if !zero.Empty() || zero.String() != "" {
		t.Errorf("zero PortSet: Empty() = %v, String() = %q", zero.Empty(), zero.String())
	}

	all := mustParse(t, "1-65535")
	if all.Contains(0) || !all.Contains(1) || !all.Contains(65535) {
		t.Errorf("1-65535 membership wrong at the edges")
	}
}

func TestPortSetEqual(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"", "", true},
		{"80,81", "80-81", true},
		{"443, 80", "80,443,", true},
		{"80", "81", false},
		{"80", "", false},
		{"80-90", "80-91", false},
	}
	for _, tt := range tests {
		if got := mustParse(t, tt.a).Equal(mustParse(t, tt.b)); got != tt.want {
			t.Errorf("%q.Equal(%q) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
	// The zero value and a parsed empty list are the same set.
	if !(PortSet{}).Equal(mustParse(t, " ")) {
		t.Error("zero PortSet != ParsePorts(\" \")")
	}
}

func mustParse(t testing.TB, s string) PortSet {
	t.Helper()
	set, err := ParsePorts(s)
	if err != nil {
		t.Fatalf("ParsePorts(%q): %v", s, err)
	}
	return set
}

func BenchmarkPortSetContains(b *testing.B) {
	var many strings.Builder
	for i := range 1000 {
		fmt.Fprintf(&many, "%d-%d,", 10+i*60, 10+i*60+29)
	}
	sets := []struct {
		name string
		list string
	}{
		{"empty", ""},
		{"one", "3306"},
		{"typical", "25,443,587,3306,4190-4191,8080-8090"},
		{"1000ranges", many.String()},
	}
	for _, s := range sets {
		set := mustParse(b, s.list)
		b.Run(s.name, func(b *testing.B) {
			var hits int
			port := uint16(1)
			for b.Loop() {
				if set.Contains(port) {
					hits++
				}
				port = port*31 + 7 // wander over the port space
			}
			_ = hits
		})
	}
}
