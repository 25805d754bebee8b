package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Module is the import path prefix of tunmesh's own code: profile entries
// are attributed to the innermost frame under it.
const Module = "github.com/tunmesh/tunmesh/"

// ProfileEntry is one line of a profile summary: what the innermost
// tunmesh function (or, for stacks without one, the innermost function
// outside the Go runtime) holds.
type ProfileEntry struct {
	Func  string // without the Module prefix
	Count float64
	Bytes float64 // heap profiles only
}

// profileRecord is one stack of a debug=1 text profile.
type profileRecord struct {
	count, bytes float64
	frames       []string // function names, innermost first
}

// ParseGoroutineProfile reads /debug/pprof/goroutine?debug=1 and returns
// the goroutines grouped by where they are (innermost tunmesh frame),
// most first, and the total.
func ParseGoroutineProfile(text []byte) ([]ProfileEntry, float64, error) {
	recs, err := parseDebug1(text, func(hdr string) (profileRecord, bool, error) {
		// "500 @ 0x48c5ee 0x4686c5 ..."
		n, _, ok := strings.Cut(hdr, " @ ")
		if !ok {
			return profileRecord{}, false, nil
		}
		c, err := strconv.ParseFloat(strings.TrimSpace(n), 64)
		if err != nil {
			return profileRecord{}, false, fmt.Errorf("goroutine profile: count %q: %w", n, err)
		}
		return profileRecord{count: c}, true, nil
	})
	if err != nil {
		return nil, 0, err
	}
	return summarize(recs, false)
}

// ParseHeapProfile reads /debug/pprof/heap?debug=1 and returns the heap in
// use grouped by where it was allocated (innermost tunmesh frame), largest
// first, and the total. The runtime samples one allocation per
// MemProfileRate bytes (512 KiB by default); each record is scaled up by
// the same estimate pprof uses, so small entries are rough.
func ParseHeapProfile(text []byte) ([]ProfileEntry, float64, error) {
	first, _, _ := bytes.Cut(text, []byte("\n"))
	// "heap profile: 11: 758016 [23: 1445272] @ heap/1048576": the last
	// figure is 2*MemProfileRate.
	_, r, ok := strings.Cut(string(first), "@ heap/")
	if !ok || !strings.HasPrefix(string(first), "heap profile:") {
		return nil, 0, fmt.Errorf("heap profile: header %q", first)
	}
	rate2, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
	if err != nil || rate2 < 0 {
		return nil, 0, fmt.Errorf("heap profile: sampling rate %q", r)
	}
	rate := rate2 / 2
	recs, err := parseDebug1(text, func(hdr string) (profileRecord, bool, error) {
		// "1: 548864 [1: 548864] @ 0x...": objects and bytes in use, then
		// allocated since start.
		inuse, _, ok := strings.Cut(hdr, " [")
		if !ok || !strings.Contains(hdr, "] @ ") || strings.HasPrefix(hdr, "heap profile:") {
			return profileRecord{}, false, nil
		}
		objs, b, ok := strings.Cut(inuse, ":")
		if !ok {
			return profileRecord{}, false, fmt.Errorf("heap profile: record %q", hdr)
		}
		o, err1 := strconv.ParseFloat(strings.TrimSpace(objs), 64)
		n, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
		if err1 != nil || err2 != nil || o < 0 || n < 0 {
			return profileRecord{}, false, fmt.Errorf("heap profile: record %q", hdr)
		}
		if o > 0 && n > 0 && rate > 0 {
			// runtime/pprof scaleHeapSample: an allocation of size s is
			// sampled with probability 1-exp(-s/rate).
			s := 1 / (1 - math.Exp(-(n/o)/rate))
			o, n = o*s, n*s
		}
		return profileRecord{count: o, bytes: n}, true, nil
	})
	if err != nil {
		return nil, 0, err
	}
	return summarize(recs, true)
}

// parseDebug1 splits a debug=1 text profile into records: a header line
// (recognised by header) followed by "#\t0xpc\tfunc+0xoff\tfile:line"
// frame lines. It stops at the heap profile's "# runtime.MemStats".
func parseDebug1(text []byte, header func(string) (profileRecord, bool, error)) ([]profileRecord, error) {
	var (
		recs []profileRecord
		cur  *profileRecord
	)
	sc := bufio.NewScanner(bytes.NewReader(text))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# runtime.MemStats") {
			break
		}
		if strings.HasPrefix(line, "#\t") {
			if cur == nil {
				continue
			}
			f := strings.Fields(line)
			if len(f) < 3 {
				return nil, fmt.Errorf("profile: frame line %q", line)
			}
			fn := f[2]
			if i := strings.LastIndex(fn, "+0x"); i > 0 {
				fn = fn[:i]
			}
			cur.frames = append(cur.frames, fn)
			continue
		}
		r, ok, err := header(line)
		if err != nil {
			return nil, err
		}
		if ok {
			recs = append(recs, r)
			cur = &recs[len(recs)-1]
		} else {
			cur = nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("profile: %w", err)
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("profile: no records")
	}
	return recs, nil
}

// where names the place a stack is attributed to: its innermost tunmesh
// frame; else its innermost frame outside the runtime; else its innermost.
func where(frames []string) string {
	for _, f := range frames {
		if rest, ok := strings.CutPrefix(f, Module); ok {
			return rest
		}
	}
	for _, f := range frames {
		if !strings.HasPrefix(f, "runtime.") && !strings.HasPrefix(f, "internal/") {
			return f
		}
	}
	if len(frames) > 0 {
		return frames[0]
	}
	return "?"
}

// summarize groups records by where and sorts them, by bytes when byBytes
// (then count), else by count; ties by name.
func summarize(recs []profileRecord, byBytes bool) ([]ProfileEntry, float64, error) {
	m := map[string]*ProfileEntry{}
	var total float64
	for _, r := range recs {
		w := where(r.frames)
		e := m[w]
		if e == nil {
			e = &ProfileEntry{Func: w}
			m[w] = e
		}
		e.Count += r.count
		e.Bytes += r.bytes
		if byBytes {
			total += r.bytes
		} else {
			total += r.count
		}
	}
	out := make([]ProfileEntry, 0, len(m))
	for _, e := range m {
		if e.Count == 0 && e.Bytes == 0 {
			continue
		}
		out = append(out, *e)
	}
	key := func(e ProfileEntry) float64 {
		if byBytes {
			return e.Bytes
		}
		return e.Count
	}
	slices.SortFunc(out, func(a, b ProfileEntry) int {
		switch ka, kb := key(a), key(b); {
		case ka > kb:
			return -1
		case ka < kb:
			return 1
		}
		return strings.Compare(a.Func, b.Func)
	})
	return out, total, nil
}
