package wireguard

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"os"
	"testing"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func newTestTUN(t *testing.T) *TUN {
	t.Helper()
	o, _ := OverlayAddr(netip.MustParseAddr("10.0.0.1"))
	tn, err := NewTUN(o, DefaultMTU)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tn.Close() })
	return tn
}

func ipv4Packet(src, dst string, payload int) []byte {
	b := make([]byte, header.IPv4MinimumSize+payload)
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: 17,
		SrcAddr: tcpipAddr(src), DstAddr: tcpipAddr(dst)})
	ip.SetChecksum(^ip.CalculateChecksum())
	return b
}

func TestTUNReadBatches(t *testing.T) {
	tn := newTestTUN(t)
	if tn.BatchSize() <= 1 {
		t.Fatalf("batch size %d", tn.BatchSize())
	}
	for i := 0; i < 5; i++ {
		tn.SendHost(ipv4Packet("10.244.0.5", "10.244.1.7", i))
	}
	bufs := make([][]byte, 3)
	for i := range bufs {
		bufs[i] = make([]byte, 2000)
	}
	sizes := make([]int, 3)
	const off = 16 // wireguard-go reads at an offset (its header)
	n, err := tn.Read(bufs, sizes, off)
	if err != nil || n != 3 {
		t.Fatalf("read %d %v, want a batch of 3", n, err)
	}
	for i := 0; i < n; i++ {
		if sizes[i] != header.IPv4MinimumSize+i || !bytes.Equal(bufs[i][off:off+sizes[i]], ipv4Packet("10.244.0.5", "10.244.1.7", i)) {
			t.Fatalf("packet %d: size %d", i, sizes[i])
		}
	}
	if n, _ = tn.Read(bufs, sizes, off); n != 2 {
		t.Fatalf("second read %d, want the 2 left", n)
	}
	tn.Close()
	if _, err := tn.Read(bufs, sizes, off); err != os.ErrClosed {
		t.Fatalf("read after close: %v", err)
	}
}

func TestTUNWriteDelivers(t *testing.T) {
	tn := newTestTUN(t)
	var host [][]byte
	tn.SetHost(func(b []byte) error { host = append(host, append([]byte(nil), b...)); return nil },
		func(dst netip.Addr) bool { return netip.MustParsePrefix("10.244.0.0/24").Contains(dst) })
	toPod := ipv4Packet("10.244.1.7", "10.244.0.5", 10)
	toElsewhere := ipv4Packet("10.244.1.7", "8.8.8.8", 10)
	garbage := []byte{0x00, 1, 2}
	// An IPv6 packet (no payload) for the overlay address.
	v6 := make([]byte, header.IPv6MinimumSize)
	header.IPv6(v6).Encode(&header.IPv6Fields{PayloadLength: 0, TransportProtocol: 59, HopLimit: 64,
		SrcAddr: tcpipAddr("fd74:6d77:67::a00:2"), DstAddr: tcpipAddr(tn.Overlay().String())})
	const off = 16
	var bufs [][]byte
	for _, p := range [][]byte{toPod, toElsewhere, garbage, v6} {
		bufs = append(bufs, append(make([]byte, off), p...))
	}
	n, err := tn.Write(bufs, off)
	if err != nil || n != len(bufs) {
		t.Fatalf("write %d %v", n, err)
	}
	if len(host) != 1 || !bytes.Equal(host[0], toPod) {
		t.Fatalf("host got %d packets, want the one for a local pod", len(host))
	}
	s := tn.Stats()
	if s.ToHost != 1 || s.Dropped != 2 || s.ToOverlay != 1 {
		t.Fatalf("stats %+v", s)
	}
	// Without a host sink (transport only) pod packets are dropped.
	tn.SetHost(nil, nil)
	tn.Write([][]byte{append(make([]byte, off), toPod...)}, off)
	if s := tn.Stats(); s.ToHost != 1 || s.Dropped != 3 {
		t.Fatalf("no sink: stats %+v", s)
	}
}

func wgMessage(typ uint32, size int) []byte {
	b := make([]byte, size)
	binary.LittleEndian.PutUint32(b, typ)
	return b
}

func TestWellFormed(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    []byte
		want bool
	}{
		{"initiation", wgMessage(device.MessageInitiationType, device.MessageInitiationSize), true},
		{"response", wgMessage(device.MessageResponseType, device.MessageResponseSize), true},
		{"cookie", wgMessage(device.MessageCookieReplyType, device.MessageCookieReplySize), true},
		{"keepalive", wgMessage(device.MessageTransportType, device.MessageKeepaliveSize), true},
		{"transport", wgMessage(device.MessageTransportType, 1400), true},
		{"short initiation", wgMessage(device.MessageInitiationType, 100), false},
		{"short transport", wgMessage(device.MessageTransportType, 20), false},
		{"unknown type", wgMessage(9, 200), false},
		{"reserved bytes set", append([]byte{4, 1, 0, 0}, make([]byte, 60)...), false},
		{"tiny", []byte{1}, false},
		{"text", []byte("hello wireguard, this is not a message"), false},
	} {
		if got := wellFormed(tc.p); got != tc.want {
			t.Errorf("%s: wellFormed = %v", tc.name, got)
		}
	}
}

// TestBindFilterCounts: malformed datagrams reach wireguard-go with size
// zero (skipped) and are counted; the others pass untouched.
func TestBindFilterCounts(t *testing.T) {
	var dropped int
	b := &nsBind{garbage: func() { dropped++ }}
	in := [][]byte{wgMessage(device.MessageTransportType, 64), []byte("garbage!"), wgMessage(device.MessageInitiationType, device.MessageInitiationSize)}
	recv := b.filter(func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i, p := range in {
			copy(packets[i], p)
			sizes[i] = len(p)
		}
		return len(in), nil
	})
	packets := [][]byte{make([]byte, 200), make([]byte, 200), make([]byte, 200)}
	sizes := make([]int, 3)
	n, err := recv(packets, sizes, make([]conn.Endpoint, 3))
	if err != nil || n != 3 {
		t.Fatalf("n %d err %v", n, err)
	}
	if sizes[0] != 64 || sizes[1] != 0 || sizes[2] != device.MessageInitiationSize || dropped != 1 {
		t.Fatalf("sizes %v dropped %d", sizes, dropped)
	}
}

func tcpipAddr(s string) tcpip.Address {
	return tcpip.AddrFromSlice(netip.MustParseAddr(s).AsSlice())
}

// sendRecorder is a Bind that records the batch sizes of Send.
type sendRecorder struct {
	conn.Bind
	batches []int
}

func (r *sendRecorder) Send(bufs [][]byte, _ conn.Endpoint) error {
	r.batches = append(r.batches, len(bufs))
	return nil
}

// TestBindSplitsOversizeBatches: a batch holding a datagram over the
// underlay's limit goes out one datagram at a time (no UDP GSO, which the
// kernel refuses for segments over the path MTU); others stay batched.
func TestBindSplitsOversizeBatches(t *testing.T) {
	rec := &sendRecorder{}
	b := &nsBind{Bind: rec, maxDatagram: 1452}
	small := [][]byte{make([]byte, 1452), make([]byte, 1452), make([]byte, 100)}
	big := [][]byte{make([]byte, 8952), make([]byte, 8952), make([]byte, 8952)}
	for _, batch := range [][][]byte{small, big} {
		if err := b.Send(batch, nil); err != nil {
			t.Fatal(err)
		}
	}
	if want := []int{3, 1, 1, 1}; len(rec.batches) != len(want) || rec.batches[0] != 3 || rec.batches[1] != 1 || rec.batches[3] != 1 {
		t.Fatalf("send batches %v, want %v", rec.batches, want)
	}
}
