package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// startEtcd starts an embedded etcd on a Unix socket in a temporary
// directory: no TCP port, so tests never collide.
func startEtcd(t testing.TB) *clientv3.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "ovl-etcd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := context.Background()
	e, err := etcd.StartEmbedded(ctx, etcd.EmbedConfig{
		Dir:       dir,
		ClientURL: "unix://" + filepath.Join(dir, "client.sock"),
		PeerURL:   "unix://" + filepath.Join(dir, "peer.sock"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	cli, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: []string{e.ClientURL}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func testNetwork() overlay.Network {
	return overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/16"), BlockBits: 26, VNI: 4096, Port: 4789}
}

func TestEnsureNetwork(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		t.Fatalf("create: %v", err)
	}
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		t.Fatalf("same again: %v", err)
	}
	other := n
	other.VNI = 5000
	_, err := s.EnsureNetwork(ctx, other)
	if !errors.Is(err, overlay.ErrConflict) || !strings.Contains(err.Error(), "vni") {
		t.Fatalf("differing vni: %v, want a conflict naming vni", err)
	}
	got, err := s.Network(ctx, "default")
	if err != nil || got != n {
		t.Fatalf("Network = %+v, %v; want %+v", got, err, n)
	}
	bad := n
	bad.CIDR = netip.MustParsePrefix("198.19.0.0/28")
	if _, err := s.EnsureNetwork(ctx, bad); !errors.Is(err, overlay.ErrInvalidNetwork) {
		t.Fatalf("invalid network: %v", err)
	}
	if _, err := s.Network(ctx, "nope"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("unknown network: %v", err)
	}
}

// TestLeaseUnderContention starts 50 hosts at the same moment, each with
// its own client, and checks that every one gets a block and no block has
// two owners.
func TestLeaseUnderContention(t *testing.T) {
	const hosts = 50
	ctx := context.Background()
	cli := startEtcd(t)
	n := testNetwork()
	n.CIDR = netip.MustParsePrefix("198.19.0.0/20") // 64 blocks for 50 hosts: crowded on purpose

	start := make(chan struct{})
	var wg sync.WaitGroup
	got := make([][]netip.Prefix, hosts)
	errs := make([]error, hosts)
	for i := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: cli.Endpoints()})
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			p := etcd.NewStore(c, "").Pool(n, overlay.HostID(fmt.Sprintf("host-%02d", i)))
			<-start
			got[i], errs[i] = p.Lease(ctx)
		}()
	}
	close(start)
	wg.Wait()

	owner := make(map[netip.Prefix]int)
	for i := range hosts {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		if len(got[i]) != 1 {
			t.Fatalf("host %d got %v", i, got[i])
		}
		if j, dup := owner[got[i][0]]; dup {
			t.Fatalf("block %s given to hosts %d and %d", got[i][0], j, i)
		}
		owner[got[i][0]] = i
	}
	owners, err := etcd.NewStore(cli, "").Pool(n, "observer").Owners(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(owners) != hosts {
		t.Fatalf("etcd holds %d blocks, want %d", len(owners), hosts)
	}
	for b, h := range owners {
		if want := fmt.Sprintf("host-%02d", owner[b]); string(h) != want {
			t.Errorf("etcd says %s owns %s; the host that got it is %s", h, b, want)
		}
	}
}

func TestLeaseSameBlockAfterRestartAndRenew(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	first, err := s.Pool(n, "a").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A restarted overlayd has a new Pool: it must find the same block.
	p := s.Pool(n, "a")
	again, err := p.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 1 || again[0] != first[0] {
		t.Fatalf("after restart got %v, want %v", again, first)
	}
	if err := p.Renew(ctx); err != nil {
		t.Fatalf("renew: %v", err)
	}
	if err := p.Renew(ctx); err != nil {
		t.Fatalf("second renew: %v", err)
	}

	// Someone else takes the block behind our back (a bug or an operator):
	// the renewal must notice and not write over it.
	key := etcd.DefaultPrefix + "networks/default/blocks/" + strings.Replace(first[0].String(), "/", "-", 1)
	if _, err := s.Client().Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client().Put(ctx, key, `{"host":"intruder"}`); err != nil {
		t.Fatal(err)
	}
	if err := p.Renew(ctx); !errors.Is(err, etcd.ErrBlockLost) {
		t.Fatalf("renew of a stolen block = %v, want ErrBlockLost", err)
	}
	resp, err := s.Client().Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Kvs[0].Value) != `{"host":"intruder"}` {
		t.Fatalf("renew wrote over another host's record: %s", resp.Kvs[0].Value)
	}
	if len(p.Held()) != 0 {
		t.Fatalf("lost block still held: %v", p.Held())
	}
}

func TestLeaseExhausted(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	n.CIDR = netip.MustParsePrefix("198.19.0.0/25") // two blocks
	for _, h := range []overlay.HostID{"a", "b"} {
		if _, err := s.Pool(n, h).Lease(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Pool(n, "c").Lease(ctx); !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("third host: %v, want ErrPoolExhausted", err)
	}
}

func TestAllocate(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	n.CIDR = netip.MustParsePrefix("198.19.0.0/29") // one /29 block: 5 usable addresses
	n.BlockBits = 29
	p := s.Pool(n, "a")
	if _, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: "x", IfName: "eth0"}); !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("allocate before lease: %v", err)
	}
	if _, err := p.Lease(ctx); err != nil {
		t.Fatal(err)
	}

	k1 := overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}
	a1, err := p.Allocate(ctx, k1)
	if err != nil {
		t.Fatal(err)
	}
	if a1.Addr.String() != "198.19.0.2/29" || !a1.New {
		t.Fatalf("first allocation = %+v, want 198.19.0.2/29 (after the gateway), new", a1)
	}
	again, err := p.Allocate(ctx, k1)
	if err != nil || again.Addr != a1.Addr || again.New {
		t.Fatalf("allocate same key = %+v, %v; want the same address, not new", again, err)
	}
	holder, err := s.Holder(ctx, n, a1.Addr.Addr())
	if err != nil || holder.ContainerID != "c1" || holder.Host != "a" {
		t.Fatalf("Holder = %+v, %v", holder, err)
	}

	// Fill the block concurrently: no duplicates, then exhaustion.
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[netip.Prefix]string{a1.Addr: "c1"}
	var exhausted int
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%d", i+2), IfName: "eth0"}
			al, err := p.Allocate(ctx, k)
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
		}()
	}
	wg.Wait()
	if len(seen) != 5 || exhausted != 2 {
		t.Fatalf("allocated %d, exhausted %d; want 5 and 2", len(seen), exhausted)
	}
	list, err := p.List(ctx)
	if err != nil || len(list) != 5 {
		t.Fatalf("List = %d, %v", len(list), err)
	}

	if err := p.Release(ctx, k1); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(ctx, k1); err != nil {
		t.Fatalf("second release: %v", err)
	}
	if _, err := p.Lookup(ctx, k1); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("lookup after release: %v", err)
	}
	reused, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: "c9", IfName: "eth0"})
	if err != nil || reused.Addr != a1.Addr {
		t.Fatalf("released address not reused: %+v, %v", reused, err)
	}

	// Releasing the host's blocks frees its addresses and attachments.
	if err := p.ReleaseBlocks(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Client().Get(ctx, etcd.DefaultPrefix+"networks/default/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if !strings.HasSuffix(string(kv.Key), "/config") {
			t.Errorf("left after ReleaseBlocks: %s", kv.Key)
		}
	}
}

func TestHostsAndWatch(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	rec := etcd.HostRecord{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: "02:00:00:00:00:01", Gossip: "198.18.0.1:7946"}
	if err := s.RegisterHost(ctx, rec); err != nil {
		t.Fatal(err)
	}
	hosts, err := s.Hosts(ctx)
	if err != nil || len(hosts) != 1 || hosts[0].Gossip != rec.Gossip {
		t.Fatalf("Hosts = %+v, %v", hosts, err)
	}

	changed := make(chan struct{}, 1)
	go s.WatchNetwork(ctx, n.Name, func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	// The watch may start after the lease; poll until it reports one.
	deadline := time.After(10 * time.Second)
	p := s.Pool(n, "a")
	if _, err := p.Lease(ctx); err != nil {
		t.Fatal(err)
	}
	for done := false; !done; {
		select {
		case <-changed:
			done = true
		case <-time.After(100 * time.Millisecond):
			_ = p.Renew(ctx)
		case <-deadline:
			t.Fatal("watch reported no change")
		}
	}
	if err := s.DeleteHost(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if hosts, _ := s.Hosts(ctx); len(hosts) != 0 {
		t.Fatalf("host still registered: %+v", hosts)
	}
}

// TestConnectSkipsDeadEndpoints: a cluster whose first listed member is
// down is still reachable.
func TestConnectSkipsDeadEndpoints(t *testing.T) {
	live := startEtcd(t).Endpoints()
	dead := "unix://" + filepath.Join(t.TempDir(), "nobody.sock")
	start := time.Now()
	cli, err := etcd.Connect(context.Background(), etcd.ClientConfig{Endpoints: append([]string{dead}, live...), DialTimeout: 3 * time.Second})
	if err != nil {
		t.Fatalf("Connect with the first endpoint dead: %v", err)
	}
	cli.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Connect took %s: it waited on the dead endpoint", d)
	}
	if _, err := etcd.Connect(context.Background(), etcd.ClientConfig{Endpoints: []string{dead}, DialTimeout: time.Second}); err == nil || !strings.Contains(err.Error(), "does not answer") {
		t.Fatalf("Connect to nothing = %v", err)
	}
}

// oneBlockPool returns a store on a fresh etcd, a network of one /26
// block, and host a's pool holding that block.
func oneBlockPool(t *testing.T) (*etcd.Store, overlay.Network, *etcd.Pool) {
	t.Helper()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	n.CIDR = netip.MustParsePrefix("198.19.0.0/26")
	p := s.Pool(n, "a")
	if _, err := p.Lease(context.Background()); err != nil {
		t.Fatal(err)
	}
	return s, n, p
}

func TestAllocateAddr(t *testing.T) {
	ctx := context.Background()
	_, _, p := oneBlockPool(t)
	k1 := overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}
	want := netip.MustParseAddr("198.19.0.40")
	al, err := p.AllocateAddr(ctx, k1, want)
	if err != nil || al.Addr.String() != "198.19.0.40/26" || !al.New {
		t.Fatalf("AllocateAddr = %+v, %v", al, err)
	}
	if again, err := p.AllocateAddr(ctx, k1, want); err != nil || again.New {
		t.Fatalf("same key, same address = %+v, %v; want it back, not new", again, err)
	}
	for _, tc := range []struct {
		key  string
		addr string
	}{
		{"c1", "198.19.0.41"}, // c1 already holds another address
		{"c2", "198.19.0.40"}, // taken by c1
		{"c2", "198.19.0.1"},  // the gateway
		{"c2", "198.19.0.63"}, // broadcast
		{"c2", "198.19.1.5"},  // not this host's block
	} {
		k := overlay.AttachmentKey{ContainerID: tc.key, IfName: "eth0"}
		if _, err := p.AllocateAddr(ctx, k, netip.MustParseAddr(tc.addr)); !errors.Is(err, overlay.ErrConflict) {
			t.Errorf("AllocateAddr(%s, %s) = %v, want ErrConflict", tc.key, tc.addr, err)
		}
	}
	// The lowest free address skips the one taken by request.
	for range 38 { // .2 to .39
		if _, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: fmt.Sprint(time.Now().UnixNano()), IfName: "eth0"}); err != nil {
			t.Fatal(err)
		}
	}
	next, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: "after", IfName: "eth0"})
	if err != nil || next.Addr.Addr().String() != "198.19.0.41" {
		t.Fatalf("next free after filling .2-.39 = %+v, %v; want .41 (.40 is taken)", next, err)
	}
}

// TestAllocateWithStaleCache: an address taken in etcd behind the pool's
// back (its cache does not know) is never handed out again.
func TestAllocateWithStaleCache(t *testing.T) {
	ctx := context.Background()
	s, n, p := oneBlockPool(t)
	first, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"})
	if err != nil || first.Addr.Addr().String() != "198.19.0.2" {
		t.Fatalf("first = %+v, %v", first, err)
	}
	// Someone else (a second overlayd with a copied host ID, an operator)
	// takes .3 directly in etcd.
	if _, err := s.Client().Put(ctx, etcd.DefaultPrefix+"networks/default/addrs/198.19.0.0-26/198.19.0.3", `{"host":"a","containerID":"intruder","ifName":"eth0"}`); err != nil {
		t.Fatal(err)
	}
	next, err := p.Allocate(ctx, overlay.AttachmentKey{ContainerID: "c2", IfName: "eth0"})
	if err != nil {
		t.Fatal(err)
	}
	if next.Addr.Addr().String() != "198.19.0.4" {
		t.Fatalf("next = %s, want .4 (.3 was taken behind the cache's back)", next.Addr)
	}
	holder, err := s.Holder(ctx, n, netip.MustParseAddr("198.19.0.3"))
	if err != nil || holder.ContainerID != "intruder" {
		t.Fatalf("the intruder's record was overwritten: %+v, %v", holder, err)
	}
}
