package workers

import (
	"sync"
	"sync/atomic"
	"testing"
)

// deep uses about depth*600 bytes of stack, as a TLS write or a policy
// decision does on a connection's first goroutine.
//
//go:noinline
func deep(depth int) byte {
	var frame [512]byte
	frame[depth%len(frame)] = byte(depth)
	if depth == 0 {
		return frame[0]
	}
	return deep(depth-1) + frame[depth%len(frame)]
}

var sink atomic.Uint32

// BenchmarkSpawn compares a plain goroutine per task with the pool, for
// tasks whose stack grows to about 4, 16 and 64 KiB, eight in flight at a
// time (a connection burst).
//
//	go test -run '^$' -bench Spawn -benchmem ./node/workers/
func BenchmarkSpawn(b *testing.B) {
	for _, depth := range []int{6, 26, 104} {
		task := func(wg *sync.WaitGroup) {
			garbage := make([]byte, 256)
			garbage[0] = deep(depth)
			sink.Add(uint32(garbage[0]))
			wg.Done()
		}
		name := map[int]string{6: "4KiB", 26: "16KiB", 104: "64KiB"}[depth]
		b.Run("go/"+name, func(b *testing.B) {
			var wg sync.WaitGroup
			for i := 0; i < b.N; i += 8 {
				wg.Add(8)
				for range 8 {
					go task(&wg)
				}
				wg.Wait()
			}
		})
		b.Run("pool/"+name, func(b *testing.B) {
			p := New(Options{})
			defer p.Close()
			var wg sync.WaitGroup
			for i := 0; i < b.N; i += 8 {
				wg.Add(8)
				for range 8 {
					p.Go(func() { task(&wg) })
				}
				wg.Wait()
			}
		})
	}
}
