package mesh

import (
	"bufio"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	osexec "os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/tunmesh/tunmesh/tools/internal/e2eenv"
	"github.com/tunmesh/tunmesh/tools/internal/namedns"
)

// server accepts on port inside a pod: each connection's bytes are
// hashed and echoed back until the client half-closes; then it half-closes
// too. It records the client address of every connection.
type server struct {
	ln      net.Listener
	mu      sync.Mutex
	remotes []netip.Addr
	hashes  [][32]byte
	wg      sync.WaitGroup
}

func serve(t *testing.T, c *e2eenv.Cluster, pod *corev1.Pod, port int) *server {
	t.Helper()
	ln, err := namedns.Listen(c.PodNetns(pod), "tcp", ":"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer conn.Close()
				h := sha256.New()
				_, _ = io.Copy(io.MultiWriter(conn, h), conn)
				_ = conn.(*net.TCPConn).CloseWrite()
				ap, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
				var sum [32]byte
				copy(sum[:], h.Sum(nil))
				s.mu.Lock()
				s.remotes = append(s.remotes, ap.Addr())
				s.hashes = append(s.hashes, sum)
				s.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *server) seen() ([]netip.Addr, [][32]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.Addr(nil), s.remotes...), append([][32]byte(nil), s.hashes...)
}

// transfer dials dst from inside pod, sends n pseudo-random bytes,
// half-closes, and checks the echo; it returns the hash of what was sent.
func transfer(t *testing.T, c *e2eenv.Cluster, from *corev1.Pod, dst string, n int, payload []byte) [32]byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := namedns.DialContext(ctx, c.PodNetns(from), "tcp", dst)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, from.Name, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(io.MultiWriter(conn, sent), 64<<10)
		var err error
		if payload != nil {
			_, err = w.Write(payload)
		} else {
			rng := rand.NewChaCha8([32]byte{byte(n)})
			_, err = io.CopyN(w, rng, int64(n))
		}
		if err == nil {
			err = w.Flush()
		}
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got := sha256.New()
	m, err := io.Copy(got, conn)
	if werr := <-errc; werr != nil {
		t.Fatalf("send to %s: %v", dst, werr)
	}
	if err != nil {
		t.Fatalf("read echo from %s: %v", dst, err)
	}
	want := len(payload)
	if payload == nil {
		want = n
	}
	if int(m) != want {
		t.Fatalf("echo from %s: %d bytes, want %d", dst, m, want)
	}
	var a, b [32]byte
	copy(a[:], sent.Sum(nil))
	copy(b[:], got.Sum(nil))
	if a != b {
		t.Fatalf("echo from %s differs from what was sent", dst)
	}
	return a
}

// agentMetric reads a counter (summed over label sets matching filter)
// from the agent of node.
func agentMetric(t *testing.T, c *e2eenv.Cluster, node, name, filter string) float64 {
	t.Helper()
	v, err := c.AgentMetric(node, name, filter)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// inNetns runs a command inside a network namespace.
func inNetns(netns string, argv ...string) (string, error) {
	cmd := osexec.Command("nsenter", append([]string{"--net=" + namedns.Path(netns), "--"}, argv...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
