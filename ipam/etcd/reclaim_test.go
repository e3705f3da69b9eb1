package etcd_test

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

const reclaimAfter = time.Hour

// The pool is what ipam.Pool claims blocks through.
var _ ipam.Leaser = (*etcd.Pool)(nil)

// owner returns the owner of block b in etcd, "" when it is free.
func owner(t *testing.T, s *etcd.Store, n overlay.Network, b netip.Prefix) overlay.HostID {
	t.Helper()
	owners, err := s.Pool(n, "observer").Owners(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return owners[b]
}

// TestReclaimAfterPeriod: the blocks of a host without a liveness key are
// noted gone at the first look, stay its own for the whole reclaim period,
// and are freed with their addresses once it has passed.
func TestReclaimAfterPeriod(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	a := s.Pool(n, "a")
	blocks, err := a.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b := blocks[0]
	al := alloc("c1", netip.PrefixFrom(b.Addr().Next().Next(), b.Bits()).String())
	if _, err := a.Mirror(ctx, []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if got, err := s.Reclaim(ctx, n, "b", reclaimAfter, t0); err != nil || len(got) != 0 {
		t.Fatalf("first look = %v, %v; want the owner noted gone, nothing freed", got, err)
	}
	if got, err := s.Reclaim(ctx, n, "b", reclaimAfter, t0.Add(reclaimAfter-time.Second)); err != nil || len(got) != 0 {
		t.Fatalf("before the period = %v, %v", got, err)
	}
	if owner(t, s, n, b) != "a" {
		t.Fatal("block freed before the period")
	}
	// A later look by another host must not restart the period.
	got, err := s.Reclaim(ctx, n, "c", reclaimAfter, t0.Add(reclaimAfter))
	if err != nil || len(got) != 1 || got[0].Block != b || got[0].Owner != "a" {
		t.Fatalf("after the period = %+v, %v; want %s freed", got, err, b)
	}
	if o := owner(t, s, n, b); o != "" {
		t.Fatalf("block still owned by %s", o)
	}
	if _, err := s.Holder(ctx, n, al.Addr.Addr()); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("address of a reclaimed block still held: %v", err)
	}
	// The owner finds out.
	if lost, err := a.Verify(ctx); !errors.Is(err, etcd.ErrBlockLost) || len(lost) != 1 {
		t.Fatalf("Verify after reclaim = %v, %v", lost, err)
	}
}

// TestReclaimNeverTakesFromLiveOwner: a host with a liveness key keeps its
// blocks however old they are, and one that comes back clears its gone
// key, so that the next time it goes the period starts again.
func TestReclaimNeverTakesFromLiveOwner(t *testing.T) {
	ctx := context.Background()
	cli := startEtcd(t)
	s := etcd.NewStore(cli, "")
	n := testNetwork()
	blocks, err := s.Pool(n, "a").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := s.Reclaim(ctx, n, "b", reclaimAfter, t0); err != nil { // noted gone at t0
		t.Fatal(err)
	}
	live := s.Liveness("a", 0, slog.New(slog.DiscardHandler))
	lease, err := live.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Coming back, even for a moment, deleted the gone key in the
	// transaction that created the liveness key.
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+"gone/a")
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("gone key left after the owner came back: %v %v", resp, err)
	}
	if got, err := s.Reclaim(ctx, n, "b", reclaimAfter, t0.Add(100*reclaimAfter)); err != nil || len(got) != 0 {
		t.Fatalf("reclaim from a live owner = %v, %v", got, err)
	}
	// a goes again: the period counts from when it is next seen gone, not
	// from t0.
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	t1 := t0.Add(100 * reclaimAfter)
	if got, err := s.Reclaim(ctx, n, "b", reclaimAfter, t1); err != nil || len(got) != 0 {
		t.Fatalf("first look after a went again = %v, %v", got, err)
	}
	if owner(t, s, n, blocks[0]) != "a" {
		t.Fatal("reclaimed with the gone record of an earlier absence")
	}
	if got, _ := s.Reclaim(ctx, n, "b", reclaimAfter, t1.Add(reclaimAfter)); len(got) != 1 {
		t.Fatalf("after the new period = %v", got)
	}
}

// TestLivenessRecreatedAfterLoss: a lost lease (revoked here, as it is
// when it expires during a quorum loss) makes the host create its key
// again, and no block changes owner.
func TestLivenessRecreatedAfterLoss(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cli := startEtcd(t)
	s := etcd.NewStore(cli, "")
	n := testNetwork()
	blocks, err := s.Pool(n, "a").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	live := s.Liveness("a", 2*time.Second, slog.New(slog.DiscardHandler))
	lease, err := live.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- live.Run(ctx, lease) }()
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := cli.Get(ctx, etcd.DefaultPrefix+"live/a")
		if err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease != int64(lease) && live.Lost() == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("liveness key not created again: lost %d, %v %v", live.Lost(), resp, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if owner(t, s, n, blocks[0]) != "a" {
		t.Fatal("block changed owner with the liveness lease")
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}
}

// TestRemoveHost: an operator removes a host that is gone at once, from
// anywhere, and is refused for a live one.
func TestRemoveHost(t *testing.T) {
	ctx := context.Background()
	cli := startEtcd(t)
	s := etcd.NewStore(cli, "")
	n := testNetwork()
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := s.RegisterHost(ctx, etcd.HostRecord{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: "02:00:00:00:00:01"}); err != nil {
		t.Fatal(err)
	}
	a := s.Pool(n, "a")
	b1, err := a.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := a.Claim(ctx, netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	al := alloc("c1", netip.PrefixFrom(b2.Addr().Next().Next(), b2.Bits()).String())
	if _, err := a.Mirror(ctx, []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	other, err := s.Pool(n, "b").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}

	live := s.Liveness("a", 0, slog.New(slog.DiscardHandler))
	lease, err := live.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RemoveHost(ctx, "a"); !errors.Is(err, etcd.ErrHostAlive) || !strings.Contains(err.Error(), "liveness key exists") {
		t.Fatalf("RemoveHost of a live host = %v", err)
	}
	if owner(t, s, n, b1[0]) != "a" {
		t.Fatal("a refused removal changed something")
	}
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	removed, err := s.RemoveHost(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if !removed.Record || len(removed.Blocks["default"]) != 2 {
		t.Fatalf("removed %+v", removed)
	}
	resp, err := cli.Get(ctx, etcd.DefaultPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Key), "/a") && !strings.Contains(string(kv.Key), "/addrs/") {
			t.Errorf("left after RemoveHost: %s", kv.Key)
		}
	}
	if _, err := s.Holder(ctx, n, al.Addr.Addr()); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("address of a removed host still held: %v", err)
	}
	if owner(t, s, n, other[0]) != "b" {
		t.Fatal("another host's block was removed")
	}
	if removed, err := s.RemoveHost(ctx, "nobody"); err != nil || removed.Record || len(removed.Blocks) != 0 {
		t.Fatalf("RemoveHost(nobody) = %+v, %v", removed, err)
	}
}
