package etcd_test

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// TestHostStatesAndBlocks: the operator's reads join a host's record,
// liveness key and gone note, and count etcd's copy of each block's
// addresses.
func TestHostStatesAndBlocks(t *testing.T) {
	ctx := context.Background()
	cli := startEtcd(t)
	s := etcd.NewStore(cli, "")
	n := testNetwork()
	if err := s.RegisterHost(ctx, etcd.HostRecord{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: "02:00:00:00:00:01"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Liveness("a", 0, slog.New(slog.DiscardHandler)).Create(ctx); err != nil {
		t.Fatal(err)
	}
	a := s.Pool(n, "a")
	ba, err := a.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.PrefixFrom(ba[0].Addr().Next().Next(), ba[0].Bits())
	if _, err := a.Mirror(ctx, []overlay.Allocation{{Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}, Addr: addr, Host: "a"}}); err != nil {
		t.Fatal(err)
	}
	// b holds a block but has neither record nor liveness key; c's
	// record cannot be decoded.
	bb, err := s.Pool(n, "b").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, etcd.DefaultPrefix+"hosts/c", "{"); err != nil {
		t.Fatal(err)
	}

	states, err := s.HostStates(ctx)
	if !errors.Is(err, etcd.ErrBadRecord) {
		t.Fatalf("HostStates error = %v, want ErrBadRecord for c", err)
	}
	if len(states) != 2 || states[0].Host != "a" || states[1].Host != "c" {
		t.Fatalf("HostStates = %+v, want a and c", states)
	}
	if states[0].Record == nil || states[0].Record.Underlay.String() != "198.18.0.1" || states[0].Live == nil || states[0].Gone != nil {
		t.Errorf("a = %+v", states[0])
	}
	if states[1].Record != nil || states[1].Live != nil {
		t.Errorf("c = %+v, want no record and no liveness", states[1])
	}

	blocks, err := s.Blocks(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	want := map[netip.Prefix]etcd.BlockState{ba[0]: {Block: ba[0], Host: "a", Addresses: 1}, bb[0]: {Block: bb[0], Host: "b"}}
	if len(blocks) != 2 {
		t.Fatalf("Blocks = %+v", blocks)
	}
	for _, got := range blocks {
		w := want[got.Block]
		if got.Host != w.Host || got.Addresses != w.Addresses || got.Claimed.IsZero() {
			t.Errorf("block %s = %+v, want host %s with %d addresses", got.Block, got, w.Host, w.Addresses)
		}
	}
	if blocks[0].Block.Addr().Compare(blocks[1].Block.Addr()) > 0 {
		t.Errorf("Blocks not sorted: %v", blocks)
	}
}
