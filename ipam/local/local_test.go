package local_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
)

// one /29 block: 5 container addresses, .2 to .6.
var (
	network = overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/16"), BlockBits: 29, VNI: 4096, Port: 4789}
	block   = netip.MustParsePrefix("198.19.0.8/29")
)

// blocks is a settable Held.
type blocks struct {
	mu sync.Mutex
	b  []netip.Prefix
}

func (b *blocks) held() []netip.Prefix {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]netip.Prefix(nil), b.b...)
}

func (b *blocks) set(p ...netip.Prefix) {
	b.mu.Lock()
	b.b = p
	b.mu.Unlock()
}

func key(id string) overlay.AttachmentKey {
	return overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}
}

func open(t *testing.T, path string, held func() []netip.Prefix) (*local.DB, *local.Allocator, bool) {
	t.Helper()
	return openNet(t, path, network, held)
}

func openNet(t *testing.T, path string, network overlay.Network, held func() []netip.Prefix) (*local.DB, *local.Allocator, bool) {
	t.Helper()
	db, err := local.Open(path, "a")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	a, fresh, err := db.Allocator(network, "a", held)
	if err != nil {
		t.Fatal(err)
	}
	return db, a, fresh
}

func TestAllocate(t *testing.T) {
	ctx := context.Background()
	var bl blocks
	_, a, fresh := open(t, filepath.Join(t.TempDir(), "alloc.db"), bl.held)
	if !fresh {
		t.Fatal("a new file is not fresh")
	}
	if _, err := a.Allocate(ctx, key("x"), overlay.Endpoint{}); !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("allocate holding no block: %v", err)
	}
	bl.set(block)

	a1, err := a.Allocate(ctx, key("c1"), overlay.Endpoint{})
	if err != nil || a1.Addr.String() != "198.19.0.10/29" || !a1.New || a1.Host != "a" {
		t.Fatalf("first allocation = %+v, %v; want 198.19.0.10/29 (after the gateway), new", a1, err)
	}
	select {
	case <-a.Changed():
	default:
		t.Fatal("an allocation did not signal Changed")
	}
	again, err := a.Allocate(ctx, key("c1"), overlay.Endpoint{})
	if err != nil || again.Addr != a1.Addr || again.New {
		t.Fatalf("allocate same key = %+v, %v; want the same address, not new", again, err)
	}

	// Fill the block concurrently: no duplicates, then exhaustion.
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[netip.Prefix]string{a1.Addr: "c1"}
	exhausted := 0
	for i := range 6 {
		wg.Go(func() {
			k := key(fmt.Sprintf("c%d", i+2))
			al, err := a.Allocate(ctx, k, overlay.Endpoint{})
			mu.Lock()
			defer mu.Unlock()
			if errors.Is(err, overlay.ErrPoolExhausted) {
				exhausted++
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			if prev, dup := seen[al.Addr]; dup {
				t.Errorf("%s given to %s and %s", al.Addr, prev, k.ContainerID)
			}
			seen[al.Addr] = k.ContainerID
		})
	}
	wg.Wait()
	if len(seen) != 5 || exhausted != 2 {
		t.Fatalf("allocated %d, exhausted %d; want 5 and 2", len(seen), exhausted)
	}
	if list, err := a.List(ctx); err != nil || len(list) != 5 || list[0].Addr != a1.Addr {
		t.Fatalf("List = %v, %v; want 5, by address", list, err)
	}

	if err := a.Release(ctx, key("c1")); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, key("c1")); err != nil {
		t.Fatalf("second release: %v", err)
	}
	if _, err := a.Lookup(ctx, key("c1")); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("lookup after release: %v", err)
	}
	reused, err := a.Allocate(ctx, key("c9"), overlay.Endpoint{})
	if err != nil || reused.Addr != a1.Addr {
		t.Fatalf("released address not reused: %+v, %v", reused, err)
	}

	// A block the host lost: its allocations are conflicts, not answers.
	bl.set(netip.MustParsePrefix("198.19.0.16/29"))
	if _, err := a.Lookup(ctx, key("c9")); !errors.Is(err, overlay.ErrConflict) {
		t.Fatalf("lookup in a lost block: %v", err)
	}
	if _, err := a.Allocate(ctx, key("c9"), overlay.Endpoint{}); !errors.Is(err, overlay.ErrConflict) {
		t.Fatalf("allocate for a key in a lost block: %v", err)
	}
	if al, err := a.Allocate(ctx, key("c10"), overlay.Endpoint{}); err != nil || al.Addr.String() != "198.19.0.18/29" {
		t.Fatalf("allocate from the new block = %+v, %v", al, err)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := a.Allocate(cctx, key("c11"), overlay.Endpoint{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("allocate with a cancelled context: %v", err)
	}
}

func TestAllocateAddr(t *testing.T) {
	ctx := context.Background()
	held := func() []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix("198.19.0.0/26")} }
	n := network
	n.BlockBits = 26
	_, a, _ := openNet(t, filepath.Join(t.TempDir(), "alloc.db"), n, held)
	want := netip.MustParseAddr("198.19.0.40")
	al, err := a.AllocateAddr(ctx, key("c1"), want, overlay.Endpoint{})
	if err != nil || al.Addr.String() != "198.19.0.40/26" || !al.New {
		t.Fatalf("AllocateAddr = %+v, %v", al, err)
	}
	if again, err := a.AllocateAddr(ctx, key("c1"), want, overlay.Endpoint{}); err != nil || again.New {
		t.Fatalf("same key, same address = %+v, %v; want it back, not new", again, err)
	}
	for _, tc := range []struct{ key, addr string }{
		{"c1", "198.19.0.41"}, // c1 already holds another address
		{"c2", "198.19.0.40"}, // taken by c1
		{"c2", "198.19.0.0"},  // the block's own address
		{"c2", "198.19.0.1"},  // the gateway
		{"c2", "198.19.0.63"}, // broadcast
		{"c2", "198.19.1.5"},  // not this host's block
	} {
		if _, err := a.AllocateAddr(ctx, key(tc.key), netip.MustParseAddr(tc.addr), overlay.Endpoint{}); !errors.Is(err, overlay.ErrConflict) {
			t.Errorf("AllocateAddr(%s, %s) = %v, want ErrConflict", tc.key, tc.addr, err)
		}
	}
	// The lowest free address skips the one taken by request.
	for i := range 38 { // .2 to .39
		if _, err := a.Allocate(ctx, key(fmt.Sprint("fill", i)), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	next, err := a.Allocate(ctx, key("after"), overlay.Endpoint{})
	if err != nil || next.Addr.Addr().String() != "198.19.0.41" {
		t.Fatalf("next free after filling .2-.39 = %+v, %v; want .41 (.40 is taken)", next, err)
	}
}

// TestDurable: what was flushed is on disk: a reopened file has it, and a
// release is not undone; what was only decided is not.
func TestDurable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "alloc.db")
	held := func() []netip.Prefix { return []netip.Prefix{block} }
	db, a, _ := open(t, path, held)
	for _, id := range []string{"c1", "c2", "c3"} {
		if _, err := a.Allocate(ctx, key(id), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Release(ctx, key("c2")); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// Decided but not flushed: not on disk.
	if _, err := a.Allocate(ctx, key("unflushed"), overlay.Endpoint{}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db, a, fresh := open(t, path, held)
	if fresh {
		t.Fatal("a reopened file is fresh")
	}
	list, _ := a.List(ctx)
	got := fmt.Sprint(list)
	if len(list) != 2 || list[0].Key.ContainerID != "c1" || list[1].Key.ContainerID != "c3" {
		t.Fatalf("after reopening: %s; want c1 and c3", got)
	}
	// The gap c2 left is the next address given.
	if al, err := a.Allocate(ctx, key("c4"), overlay.Endpoint{}); err != nil || al.Addr.String() != "198.19.0.11/29" {
		t.Fatalf("after reopening, allocate = %+v, %v; want .11", al, err)
	}
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	// Dropping the network forgets it; other networks' buckets are apart.
	other := network
	other.Name = "other"
	oa, _, err := db.Allocator(other, "a", held)
	if err != nil {
		t.Fatal(err)
	}
	if l, _ := oa.List(ctx); len(l) != 0 {
		t.Fatalf("another network sees %v", l)
	}
	if err := db.Drop(network.Name); err != nil {
		t.Fatal(err)
	}
	if _, fresh, err := db.Allocator(network, "a", held); err != nil || !fresh {
		t.Fatalf("after Drop: fresh %v, %v", fresh, err)
	}
}

// TestFlushKeepsOrder: decisions are seen at once and reach the disk in
// the order they were made, whoever flushes; a failed flush keeps them
// for the next.
func TestFlushKeepsOrder(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "alloc.db")
	held := func() []netip.Prefix { return []netip.Prefix{block} }
	db, a, _ := open(t, path, held)
	first, _ := a.Allocate(ctx, key("c1"), overlay.Endpoint{}) // .10
	if err := a.Release(ctx, key("c1")); err != nil {
		t.Fatal(err)
	}
	again, _ := a.Allocate(ctx, key("c2"), overlay.Endpoint{}) // .10 again, before any flush
	if again.Addr != first.Addr {
		t.Fatalf("a released address is not free at once: %s then %s", first.Addr, again.Addr)
	}
	if _, err := a.Allocate(ctx, key("c3"), overlay.Endpoint{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, key("c3")); err != nil {
		t.Fatal(err)
	}
	// Concurrent flushes share commits and all return once theirs is in.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if err := a.Flush(ctx); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	db.Close()
	if err := a.Flush(ctx); err != nil {
		t.Fatalf("a flush with nothing to commit = %v", err)
	}
	if _, err := a.Allocate(ctx, key("c4"), overlay.Endpoint{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(ctx); err == nil {
		t.Fatal("a flush on a closed file succeeded")
	}
	if _, err := a.Lookup(ctx, key("c4")); err != nil {
		t.Fatalf("a decision whose flush failed is forgotten: %v", err)
	}

	_, b, _ := open(t, path, held)
	list, _ := b.List(ctx)
	if len(list) != 1 || list[0].Key.ContainerID != "c2" || list[0].Addr != first.Addr {
		t.Fatalf("on disk: %v; want c2 on %s alone", list, first.Addr)
	}
}

func TestOpenRefuses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "alloc.db")
	db, err := local.Open(path, "a")
	if err != nil {
		t.Fatal(err)
	}
	// Locked: another overlayd on the same data directory.
	if _, err := local.Open(path, "a"); err == nil || !strings.Contains(err.Error(), "another overlayd") {
		t.Fatalf("second Open while held = %v", err)
	}
	db.Close()
	// Another host's file.
	if _, err := local.Open(path, "b"); err == nil || !strings.Contains(err.Error(), "belongs to host a") {
		t.Fatalf("Open for another host = %v", err)
	}
}

func TestImport(t *testing.T) {
	ctx := context.Background()
	held := func() []netip.Prefix { return []netip.Prefix{block} }
	path := filepath.Join(t.TempDir(), "alloc.db")
	_, a, _ := open(t, path, held)
	al := func(id, addr string) overlay.Allocation {
		return overlay.Allocation{Key: key(id), Addr: netip.MustParsePrefix(addr), Host: "a"}
	}
	if _, err := a.Allocate(ctx, key("mine"), overlay.Endpoint{}); err != nil { // .10
		t.Fatal(err)
	}
	err := a.Import(ctx, []overlay.Allocation{
		al("old1", "198.19.0.12/29"),
		al("old1", "198.19.0.13/29"), // the same key twice: the first wins
		al("old2", "198.19.0.10/29"), // an address already recorded
		al("mine", "198.19.0.14/29"), // a key already recorded
	})
	if err != nil {
		t.Fatal(err)
	}
	list, _ := a.List(ctx)
	if fmt.Sprint(list) != fmt.Sprint([]overlay.Allocation{al("mine", "198.19.0.10/29"), al("old1", "198.19.0.12/29")}) {
		t.Fatalf("after Import: %v", list)
	}
	if next, err := a.Allocate(ctx, key("next"), overlay.Endpoint{}); err != nil || next.Addr.String() != "198.19.0.11/29" {
		t.Fatalf("allocate after Import = %+v, %v", next, err)
	}
	if next, err := a.Allocate(ctx, key("next2"), overlay.Endpoint{}); err != nil || next.Addr.String() != "198.19.0.13/29" {
		t.Fatalf("allocate after Import skips .12 = %+v, %v", next, err)
	}
}

// BenchmarkAllocateRelease measures one allocation and its release, each
// flushed to disk: the store's share of an ADD and a DEL.
func BenchmarkAllocateRelease(b *testing.B) {
	ctx := context.Background()
	db, err := local.Open(filepath.Join(b.TempDir(), "alloc.db"), "a")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	n := network
	n.BlockBits = 24
	a, _, err := db.Allocator(n, "a", func() []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix("198.19.7.0/24")} })
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; b.Loop(); i++ {
		k := key(fmt.Sprint("c", i))
		if _, err := a.Allocate(ctx, k, overlay.Endpoint{}); err != nil {
			b.Fatal(err)
		}
		if err := a.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		if err := a.Release(ctx, k); err != nil {
			b.Fatal(err)
		}
		if err := a.Flush(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// TestNetworkIDAndList: the file records the ID of the network whose
// allocations it holds, lists its networks, and forgets both with Drop.
func TestNetworkIDAndList(t *testing.T) {
	path := filepath.Join(t.TempDir(), "allocations.db")
	n := network
	n.ID = "0123456789abcdef0123456789abcdef"
	db, _, _ := openNet(t, path, n, func() []netip.Prefix { return nil })
	if id, err := db.NetworkID(n.Name); err != nil || id != n.ID {
		t.Fatalf("NetworkID = %q, %v; want %q", id, err, n.ID)
	}
	if id, _ := db.NetworkID("other"); id != "" {
		t.Fatalf("NetworkID of a network never opened = %q", id)
	}
	// A network without an ID (the sweep's view) leaves the ID alone.
	if _, _, err := db.Allocator(overlay.Network{Name: n.Name}, "a", func() []netip.Prefix { return nil }); err != nil {
		t.Fatal(err)
	}
	if id, _ := db.NetworkID(n.Name); id != n.ID {
		t.Fatalf("NetworkID after an open without ID = %q", id)
	}
	if names, err := db.Networks(); err != nil || len(names) != 1 || names[0] != n.Name {
		t.Fatalf("Networks = %v, %v", names, err)
	}
	if err := db.Drop(n.Name); err != nil {
		t.Fatal(err)
	}
	if id, _ := db.NetworkID(n.Name); id != "" {
		t.Fatalf("NetworkID after Drop = %q", id)
	}
	if names, _ := db.Networks(); len(names) != 0 {
		t.Fatalf("Networks after Drop = %v", names)
	}
}

// TestEndpoints: an allocation's MAC address and labels are kept with it,
// across a reopening, and go with its release; an interface that holds
// an address keeps the endpoint it was given.
func TestEndpoints(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "alloc.db")
	held := func() []netip.Prefix { return []netip.Prefix{block} }
	db, a, _ := open(t, path, held)
	mac := net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
	labels := map[string]string{"app": "web", "tier": "front"}
	ep := overlay.Endpoint{MAC: mac, Labels: labels}
	if _, err := a.Allocate(ctx, key("c1"), ep); err != nil {
		t.Fatal(err)
	}
	labels["app"] = "changed by the caller" // the allocator keeps its own copy
	if _, err := a.AllocateAddr(ctx, key("c2"), netip.MustParseAddr("198.19.0.12"), overlay.Endpoint{Labels: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(ctx, key("bare"), overlay.Endpoint{}); err != nil {
		t.Fatal(err)
	}
	again, err := a.Allocate(ctx, key("c1"), overlay.Endpoint{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}})
	if err != nil || again.New || again.Endpoint.MAC.String() != mac.String() || again.Endpoint.Labels["app"] != "web" {
		t.Fatalf("second Allocate of c1 = %+v, %v; want its first endpoint", again, err)
	}
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db, a, _ = open(t, path, held)
	want := map[string]overlay.Endpoint{
		"c1":   {MAC: mac, Labels: map[string]string{"app": "web", "tier": "front"}},
		"c2":   {Labels: map[string]string{"k": "v"}},
		"bare": {},
	}
	list, _ := a.List(ctx)
	if len(list) != len(want) {
		t.Fatalf("after reopening: %v; want %d allocations", list, len(want))
	}
	for _, al := range list {
		if w := want[al.Key.ContainerID]; !al.Endpoint.Equal(w) {
			t.Errorf("after reopening, %s has endpoint %+v; want %+v", al.Key, al.Endpoint, w)
		}
	}
	// Released and given again without an endpoint: nothing of the old one.
	if err := a.Release(ctx, key("c1")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(ctx, key("c1"), overlay.Endpoint{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	db.Close()
	_, a, _ = open(t, path, held)
	if al, err := a.Lookup(ctx, key("c1")); err != nil || !al.Endpoint.IsZero() {
		t.Fatalf("c1 re-allocated without an endpoint: %+v, %v; want none", al, err)
	}
}

// TestEndpointsOlderFile: a file written by an overlayd that kept no
// endpoints opens, its allocations with none; an endpoint whose
// allocation such an overlayd released (it leaves the endpoint bucket
// alone), or that cannot be decoded, is forgotten.
func TestEndpointsOlderFile(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "alloc.db")
	// The file as an older overlayd left it. "network/older" has no
	// endpoint bucket at all; "gone" has an endpoint and no allocation,
	// "bad" and "multicast" endpoints that cannot be used.
	writeBolt(t, path, map[string]map[string]string{
		"meta": {"host": "a"},
		"network/" + network.Name: {
			"old/eth0": "198.19.0.10/29", "multicast/eth0": "198.19.0.12/29", "bad/eth0": "198.19.0.11/29",
		},
		"network/older": {"o/eth0": "198.19.0.9/29"},
		"endpoint/" + network.Name: {
			"multicast/eth0": `{"mac":"01:00:5e:00:00:01","labels":{"k":"v"}}`,
			"bad/eth0":       `{"mac":"not a mac"}`,
			"gone/eth0":      `{"mac":"02:00:00:00:00:07"}`,
		},
	})

	db, a, fresh := open(t, path, func() []netip.Prefix { return []netip.Prefix{block} })
	if fresh {
		t.Fatal("an older file with allocations opened as fresh")
	}
	if al, err := a.Lookup(ctx, key("old")); err != nil || al.Addr.String() != "198.19.0.10/29" || !al.Endpoint.IsZero() {
		t.Fatalf("old = %+v, %v; want 198.19.0.10/29 with no endpoint", al, err)
	}
	older := network
	older.Name = "older"
	oa, fresh, err := db.Allocator(older, "a", func() []netip.Prefix { return []netip.Prefix{block} })
	if err != nil || fresh {
		t.Fatalf("a network without an endpoint bucket: fresh %v, %v", fresh, err)
	}
	if al, err := oa.Lookup(ctx, key("o")); err != nil || al.Addr.String() != "198.19.0.9/29" || !al.Endpoint.IsZero() {
		t.Fatalf("o = %+v, %v; want 198.19.0.9/29 with no endpoint", al, err)
	}
	// An endpoint that cannot be decoded costs its MAC and labels, not
	// the network.
	if al, err := a.Lookup(ctx, key("bad")); err != nil || al.Addr.String() != "198.19.0.11/29" || !al.Endpoint.IsZero() {
		t.Fatalf("bad = %+v, %v; want 198.19.0.11/29 with no endpoint", al, err)
	}
	if al, err := a.Lookup(ctx, key("multicast")); err != nil || !al.Endpoint.IsZero() {
		t.Fatalf("multicast = %+v, %v; want no endpoint: a multicast MAC is not one to give a container", al, err)
	}
	db.Close()
	bdb, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	bdb.View(func(tx *bolt.Tx) error {
		for _, k := range []string{"gone/eth0", "bad/eth0", "multicast/eth0"} {
			if v := tx.Bucket([]byte("endpoint/" + network.Name)).Get([]byte(k)); v != nil {
				t.Errorf("endpoint %s is still on disk: %s", k, v)
			}
		}
		return nil
	})
}

// writeBolt writes a bbolt file at path with the given buckets and keys.
func writeBolt(t *testing.T, path string, buckets map[string]map[string]string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		for name, kvs := range buckets {
			b, err := tx.CreateBucket([]byte(name))
			if err != nil {
				return err
			}
			for k, v := range kvs {
				if err := b.Put([]byte(k), []byte(v)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
