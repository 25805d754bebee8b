package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/tunmesh/tunmesh/node/capture"
)

func rawTCP(src, dst netip.AddrPort) []byte {
	b := make([]byte, 40)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], 40)
	b[8], b[9] = 64, 6
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	b[32] = 5 << 4
	b[33] = 0x10
	return b
}

// TestCaptureFilterThroughTshark: --filter keeps what the display filter
// selects, as pcapng.
func TestCaptureFilterThroughTshark(t *testing.T) {
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Skip("tshark not installed")
	}
	var pcap bytes.Buffer
	src := netip.MustParseAddrPort("10.1.0.5:40000")
	pkts := [][]byte{rawTCP(src, netip.MustParseAddrPort("10.1.0.6:8080")), rawTCP(src, netip.MustParseAddrPort("10.1.0.6:9999")), rawTCP(src, netip.MustParseAddrPort("10.1.0.6:8080"))}
	_, err := capture.Run(context.Background(), &pcap, nil, capture.Request{MaxPackets: len(pkts), Duration: 10 * time.Second}, []capture.Source{{
		Name: "tm0", LinkType: layers.LinkTypeRaw,
		Start: func(emit func([]byte, bool)) (func(), error) {
			for _, p := range pkts {
				emit(p, false)
			}
			return func() {}, nil
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := throughTshark(&pcap, &out, "tcp.dstport == 8080", io.Discard); err != nil {
		t.Fatalf("tshark: %v", err)
	}
	r, err := pcapgo.NewNgReader(&out, pcapgo.NgReaderOptions{})
	if err != nil {
		t.Fatalf("filtered output is not pcapng: %v", err)
	}
	n := 0
	for {
		if _, _, err := r.ReadPacketData(); err != nil {
			break
		}
		n++
	}
	if n != 2 {
		t.Fatalf("%d packets after the filter, want 2", n)
	}
}
