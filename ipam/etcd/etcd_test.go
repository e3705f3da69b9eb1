package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// startEtcd starts an embedded etcd for the test and returns its client.
// startEtcd returns a client of a new embedded etcd that holds
// testNetwork (block claims are fenced on their network existing).
func startEtcd(t testing.TB) *clientv3.Client {
	cli := etcdtest.Start(t)
	ensureNetwork(t, cli, "")
	return cli
}

// ensureNetwork stores testNetwork below prefix.
func ensureNetwork(t testing.TB, cli *clientv3.Client, prefix string) {
	t.Helper()
	if _, err := etcd.NewStore(cli, prefix).EnsureNetwork(context.Background(), testNetwork()); err != nil {
		t.Fatal(err)
	}
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
	if err != nil || got.Diff(n) != "" || got.ID == "" {
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
	overlapping := n
	overlapping.Name, overlapping.CIDR, overlapping.VNI = "blue", netip.MustParsePrefix("198.19.128.0/17"), 5001
	if _, err := s.EnsureNetwork(ctx, overlapping); !errors.Is(err, overlay.ErrConflict) || !strings.Contains(err.Error(), `overlaps network "default"`) {
		t.Fatalf("overlapping network: %v", err)
	}
	apart := overlapping
	apart.CIDR = netip.MustParsePrefix("198.20.0.0/16")
	if _, err := s.EnsureNetwork(ctx, apart); err != nil {
		t.Fatalf("a network apart: %v", err)
	}
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		t.Fatalf("the first network again, after another was created: %v", err)
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

func TestLeaseSameBlockAfterRestartAndVerify(t *testing.T) {
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
	if lost, err := p.Verify(ctx); err != nil || len(lost) != 0 {
		t.Fatalf("verify: %v, %v", lost, err)
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
	if lost, err := p.Verify(ctx); !errors.Is(err, etcd.ErrBlockLost) || len(lost) != 1 || lost[0] != first[0] {
		t.Fatalf("verify of a stolen block = %v, %v; want %v and ErrBlockLost", lost, err, first)
	}
	resp, err := s.Client().Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Kvs[0].Value) != `{"host":"intruder"}` {
		t.Fatalf("verify wrote over another host's record: %s", resp.Kvs[0].Value)
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

func alloc(cid, addr string) overlay.Allocation {
	return overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: cid, IfName: "eth0"}, Addr: netip.MustParsePrefix(addr), Host: "a"}
}

// TestMirror: etcd ends up with exactly the host's own record of its
// allocations, in as many transactions as it takes, and never in a block
// the host lost.
func TestMirror(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	n.BlockBits = 24
	p := s.Pool(n, "a")
	blocks, err := p.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b := blocks[0]
	addr := func(i int) string {
		a := b.Addr()
		for range i {
			a = a.Next()
		}
		return netip.PrefixFrom(a, b.Bits()).String()
	}
	// 150 allocations need two transactions of attachment and address
	// keys; one in a block the host does not hold is not copied.
	var want []overlay.Allocation
	for i := 2; i < 152; i++ {
		want = append(want, alloc(fmt.Sprintf("c%d", i), addr(i)))
	}
	foreign := alloc("elsewhere", "198.19.0.2/24")
	if b.Contains(foreign.Addr.Addr()) {
		foreign = alloc("elsewhere", "198.19.1.2/24")
	}
	// An address record nobody gave out, in the host's block.
	stray := etcd.DefaultPrefix + "networks/default/addrs/" + strings.ReplaceAll(b.String(), "/", "-") + "/" + netip.MustParsePrefix(addr(200)).Addr().String()
	if _, err := s.Client().Put(ctx, stray, `{"host":"a","containerID":"stray","ifName":"eth0"}`); err != nil {
		t.Fatal(err)
	}
	changed, err := p.Mirror(ctx, append(want, foreign))
	if err != nil || changed != 301 {
		t.Fatalf("Mirror = %d, %v; want 300 puts and 1 delete", changed, err)
	}
	check := func(want []overlay.Allocation) {
		t.Helper()
		list, err := p.List(ctx)
		if err != nil || len(list) != len(want) {
			t.Fatalf("List = %d, %v; want %d", len(list), err, len(want))
		}
		for _, al := range want {
			h, err := s.Holder(ctx, n, al.Addr.Addr())
			if err != nil || h.ContainerID != al.Key.ContainerID || h.Host != "a" {
				t.Fatalf("Holder(%s) = %+v, %v; want %s", al.Addr, h, err, al.Key)
			}
		}
	}
	check(want)
	if _, err := s.Holder(ctx, n, netip.MustParsePrefix(addr(200)).Addr()); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("the stray record is still there: %v", err)
	}
	if _, err := s.Holder(ctx, n, foreign.Addr.Addr()); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("an allocation outside the held blocks was copied: %v", err)
	}
	// Mirroring the same again changes nothing; a release and a new
	// allocation change three keys and one.
	if changed, err := p.Mirror(ctx, want); err != nil || changed != 0 {
		t.Fatalf("second Mirror = %d, %v; want 0", changed, err)
	}
	want = append(want[1:], alloc("new", addr(2)))
	if changed, err := p.Mirror(ctx, want); err != nil || changed != 3 {
		t.Fatalf("Mirror after a release and a re-use = %d, %v; want 3 (one attachment key gone, one new, the address record rewritten)", changed, err)
	}
	check(want)

	// A block deleted behind the host's back is never written to.
	if _, err := s.Client().Delete(ctx, etcd.DefaultPrefix+"networks/default/blocks/"+strings.ReplaceAll(b.String(), "/", "-")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Mirror(ctx, append(want, alloc("late", addr(160)))); !errors.Is(err, etcd.ErrBlockLost) {
		t.Fatalf("Mirror into a lost block = %v, want ErrBlockLost", err)
	}
	if _, err := s.Holder(ctx, n, netip.MustParsePrefix(addr(160)).Addr()); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("written into a lost block: %v", err)
	}
}

// TestReleaseBlocks: giving back the host's blocks removes its addresses
// and its attachment index with them.
func TestReleaseBlocks(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	p := s.Pool(testNetwork(), "a")
	blocks, err := p.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	al := alloc("c1", netip.PrefixFrom(blocks[0].Addr().Next().Next(), blocks[0].Bits()).String())
	if _, err := p.Mirror(ctx, []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	if err := p.ReleaseBlocks(ctx); err != nil {
		t.Fatal(err)
	}
	if len(p.Held()) != 0 {
		t.Fatalf("still held: %v", p.Held())
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
			_, _ = p.Claim(ctx, netip.Prefix{}, nil)
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

// TestHostsLeavesOutBadRecords: a record that is not JSON, or whose VTEP
// MAC is malformed, is left out with an error wrapping ErrBadRecord, and
// the good ones are returned; an etcd that cannot be read is another
// error.
func TestHostsLeavesOutBadRecords(t *testing.T) {
	ctx := context.Background()
	cli := startEtcd(t)
	s := etcd.NewStore(cli, "")
	good := etcd.HostRecord{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: "02:00:00:00:00:01"}
	badMAC := etcd.HostRecord{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: "not a mac"}
	for _, r := range []etcd.HostRecord{good, badMAC} {
		if err := s.RegisterHost(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cli.Put(ctx, etcd.DefaultPrefix+"hosts/c", "{not json"); err != nil {
		t.Fatal(err)
	}
	hosts, err := s.Hosts(ctx)
	if !errors.Is(err, etcd.ErrBadRecord) || len(hosts) != 1 || hosts[0].Host != "a" {
		t.Fatalf("Hosts = %+v, %v; want only a, and an ErrBadRecord", hosts, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Hosts(cctx); err == nil || errors.Is(err, etcd.ErrBadRecord) {
		t.Fatalf("Hosts with a cancelled context = %v; want a read error, not ErrBadRecord", err)
	}
}

// TestClaimWhoseAnswerIsLost: a claim that commits but whose answer is
// lost (a timeout under load) is sent again, finds its first attempt and
// holds the block, not leaked: etcd and the pool agree on the host's
// blocks.
func TestClaimWhoseAnswerIsLost(t *testing.T) {
	// A lost answer surfaces as a gRPC status or as the context's error.
	for _, lost := range []error{status.Error(codes.DeadlineExceeded, "the answer was lost"), context.DeadlineExceeded} {
		t.Run(fmt.Sprint(lost), func(t *testing.T) { claimWithAnswerLost(t, lost) })
	}
}

func claimWithAnswerLost(t *testing.T, lost error) {
	ctx := context.Background()
	cli := startEtcd(t)
	var lose atomic.Bool
	lossy, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: cli.Endpoints(), DialOptions: []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			err := invoker(ctx, method, req, reply, cc, opts...)
			if err == nil && method == "/etcdserverpb.KV/Txn" && lose.CompareAndSwap(true, false) {
				return lost
			}
			return err
		}),
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lossy.Close() })
	n := testNetwork()
	p := etcd.NewStore(lossy, "").Pool(n, "a")
	lose.Store(true)
	b, err := p.Claim(ctx, netip.Prefix{}, nil)
	if err != nil {
		t.Fatalf("Claim with its answer lost = %v; want the committed block", err)
	}
	if lose.Load() {
		t.Fatal("the interceptor lost no answer: the test tests nothing")
	}
	if held := p.Held(); len(held) != 1 || held[0] != b {
		t.Fatalf("pool holds %v, want [%s]", held, b)
	}
	owners, err := etcd.NewStore(cli, "").Pool(n, "checker").Owners(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(owners) != 1 || owners[b] != "a" {
		t.Fatalf("etcd's owners %v, want only %s of a", owners, b)
	}
	// The pool holds the block with the revision etcd has: giving it
	// back works.
	if err := p.Give(ctx, b); err != nil {
		t.Fatalf("Give of the found block: %v", err)
	}
}
