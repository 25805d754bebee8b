package main

import (
	"flag"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// parseInterspersed parses flags that may appear before, between and after
// positional arguments (the flag package alone stops at the first
// positional). It returns the positional arguments in order. A "--" that
// is not a flag's value ends flag parsing; everything after it is
// positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if endsWithTerminator(fs, args[:len(args)-len(rest)]) {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// endsWithTerminator reports whether the flag package consumed a "--"
// terminator as the last of the consumed arguments, rather than as the value
// of a flag such as `--send --`. consumed must have parsed successfully.
func endsWithTerminator(fs *flag.FlagSet, consumed []string) bool {
	for i := 0; i < len(consumed); {
		arg := consumed[i]
		if arg == "--" {
			return true
		}
		name := strings.TrimPrefix(strings.TrimPrefix(arg, "-"), "-")
		if strings.Contains(name, "=") || isBoolFlag(fs.Lookup(name)) {
			i++
		} else {
			i += 2 // the flag and its value
		}
	}
	return false
}

func isBoolFlag(f *flag.Flag) bool {
	if f == nil {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// durationValue is a flag.Value for durations accepted by parseDuration.
type durationValue time.Duration

func durationVar(fs *flag.FlagSet, p *time.Duration, name string, value time.Duration, usage string) {
	*p = value
	fs.Var((*durationValue)(p), name, usage)
}

func (d *durationValue) Set(s string) error {
	v, err := parseDuration(s)
	if err != nil {
		return err
	}
	*d = durationValue(v)
	return nil
}

func (d *durationValue) String() string { return time.Duration(*d).String() }

// parseDuration accepts a non-negative Go duration ("500ms", "1m30s") or a
// plain number of seconds ("5", "0.25").
func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, fmt.Errorf("invalid duration %q: want e.g. 500ms, 2s, 1m or a number of seconds", s)
		}
		if f > float64(math.MaxInt64)/float64(time.Second) {
			return 0, fmt.Errorf("duration %q is too large", s)
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d < 0 {
		return 0, fmt.Errorf("invalid duration %q: must not be negative", s)
	}
	return d, nil
}

// byteSizeValue is a flag.Value for sizes accepted by parseByteSize.
type byteSizeValue int64

func (b *byteSizeValue) Set(s string) error {
	v, err := parseByteSize(s)
	if err != nil {
		return err
	}
	*b = byteSizeValue(v)
	return nil
}

func (b *byteSizeValue) String() string { return strconv.FormatInt(int64(*b), 10) }

// byteUnits are the suffixes parseByteSize accepts, longest first.
var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30},
	{"kb", 1 << 10}, {"mb", 1 << 20}, {"gb", 1 << 30},
	{"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30},
	{"b", 1},
}

// parseByteSize accepts a non-negative integer with an optional binary
// suffix, case-insensitive: K, M, G (also written KB/KiB etc.) are powers
// of 1024 and B is bytes, so 4M, 4MB and 4MiB all mean 4*2^20.
func parseByteSize(s string) (int64, error) {
	num := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSuffix(num, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid size %q: want a non-negative integer with optional K, M or G suffix", s)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}
