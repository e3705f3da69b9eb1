package ipam_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
)

// etcdHost is one host of a test against a real etcd: its pool over
// etcd.Pool and its own record in a file.
type etcdHost struct {
	id     overlay.HostID
	leaser *etcd.Pool
	pool   *ipam.Pool
}

func newEtcdHost(t *testing.T, store *etcd.Store, n overlay.Network, id overlay.HostID, dir string, cfg ipam.Config) *etcdHost {
	t.Helper()
	db, err := local.Open(filepath.Join(dir, string(id)+".db"), id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	leaser := store.Pool(n, id)
	cfg.Network, cfg.Host = n, id
	p, err := ipam.New(cfg, leaser, func(usable func() []netip.Prefix) (ipam.Book, error) {
		a, _, err := db.Allocator(n, id, usable)
		return a, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return &etcdHost{id: id, leaser: leaser, pool: p}
}

// checkOwners checks etcd's blocks against what every host believes it
// holds: each host holds want blocks, no block is held by two hosts, and
// every block a host believes it holds is its own in etcd.
func checkOwners(t *testing.T, store *etcd.Store, n overlay.Network, hosts []*etcdHost, want int) {
	t.Helper()
	owners, err := store.Pool(n, "checker").Owners(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(owners) != len(hosts)*want {
		t.Errorf("etcd holds %d blocks, want %d (%d hosts of %d)", len(owners), len(hosts)*want, len(hosts), want)
	}
	perHost := make(map[overlay.HostID]int)
	for _, h := range owners {
		perHost[h]++
	}
	believed := make(map[netip.Prefix]overlay.HostID)
	for _, h := range hosts {
		if perHost[h.id] != want {
			t.Errorf("etcd gives host %s %d blocks, want %d", h.id, perHost[h.id], want)
		}
		held := h.pool.Held()
		if len(held) > want {
			t.Errorf("host %s holds %d blocks, more than its cap %d", h.id, len(held), want)
		}
		for _, b := range held {
			if o, dup := believed[b]; dup {
				t.Errorf("block %s is believed held by both %s and %s", b, o, h.id)
			}
			believed[b] = h.id
			if owners[b] != h.id {
				t.Errorf("host %s believes it holds %s, which etcd gives to %q", h.id, b, owners[b])
			}
		}
	}
}

// TestThousandHostsClaimAtOnce starts 1000 hosts in one process against
// one embedded etcd, all claiming their first block at the same moment,
// then has each fill its blocks until it reaches its cap of three: every
// block has exactly one owner, no host exceeds the cap, the host at its
// cap gets an error that names it, and no address is handed out twice.
func TestThousandHostsClaimAtOnce(t *testing.T) {
	const hosts, maxBlocks = 1000, 3
	if testing.Short() {
		t.Skip("1000 hosts against a real etcd: skipped with -short")
	}
	ctx := context.Background()
	store := etcd.NewStore(etcdtest.Start(t), "")
	// 4096 blocks of /28 (13 containers each, so that filling three
	// takes few ADDs) for 3000 claims: racing hosts collide.
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.64.0.0/16"), BlockBits: 28, VNI: 1, Port: 4789}
	if _, err := store.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	hs := make([]*etcdHost, hosts)
	for i := range hs {
		hs[i] = newEtcdHost(t, store, n, overlay.HostID(fmt.Sprintf("h%04d", i)), dir, ipam.Config{MaxBlocks: maxBlocks})
	}

	start := make(chan struct{})
	errs := make([]error, hosts)
	var wg sync.WaitGroup
	for i, h := range hs {
		wg.Go(func() {
			<-start
			errs[i] = h.pool.Ensure(ctx)
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	t.Logf("%d hosts claimed their first block at once in %v", hosts, time.Since(t0).Round(time.Millisecond))
	for i, err := range errs {
		if err != nil {
			t.Fatalf("host %s: first block: %v", hs[i].id, err)
		}
	}
	checkOwners(t, store, n, hs, 1)
	if t.Failed() {
		return
	}

	// Each host fills its blocks, claiming the next in the background,
	// until the cap stops it.
	runCtx, cancel := context.WithCancel(ctx)
	var runs sync.WaitGroup
	t.Cleanup(func() { cancel(); runs.Wait() })
	for _, h := range hs {
		runs.Go(func() { h.pool.Run(runCtx) })
	}
	capacity := maxBlocks * n.BlockCapacity()
	addrs := make([][]netip.Prefix, hosts)
	// All 1000 at once can overload a 2-core machine under the race
	// detector until etcd requests time out. An ADD that fails that way
	// is retried, as a runtime would.
	var retriesMu sync.Mutex
	retries := 0
	t0 = time.Now()
	for i, h := range hs {
		wg.Go(func() {
			for c, tries := 0, 0; ; {
				al, err := h.pool.Allocate(ctx, overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%d", c), IfName: "eth0"}, overlay.Endpoint{})
				if errors.Is(err, context.DeadlineExceeded) && tries < 3 {
					tries++
					retriesMu.Lock()
					retries++
					retriesMu.Unlock()
					continue
				}
				if err != nil {
					errs[i] = err
					return
				}
				addrs[i] = append(addrs[i], al.Addr)
				c, tries = c+1, 0
			}
		})
	}
	wg.Wait()
	t.Logf("%d hosts grew to %d blocks and filled them in %v (%d ADDs retried after an etcd timeout)",
		hosts, maxBlocks, time.Since(t0).Round(time.Millisecond), retries)
	for i, h := range hs {
		err := errs[i]
		if !errors.Is(err, overlay.ErrPoolExhausted) || !strings.Contains(err.Error(), fmt.Sprintf("max blocks per host %d", maxBlocks)) {
			t.Fatalf("host %s: allocation past its cap: %v, want an exhausted pool naming the cap", h.id, err)
		}
		if len(addrs[i]) != capacity {
			t.Errorf("host %s allocated %d addresses, want %d (%d blocks of %d)", h.id, len(addrs[i]), capacity, maxBlocks, n.BlockCapacity())
		}
		if s := h.pool.Stats(); s.Claims != maxBlocks {
			t.Errorf("host %s: stats %+v, want %d claims", h.id, s, maxBlocks)
		}
	}
	checkOwners(t, store, n, hs, maxBlocks)
	seen := make(map[netip.Addr]overlay.HostID, hosts*capacity)
	for i, list := range addrs {
		for _, a := range list {
			if o, dup := seen[a.Addr()]; dup {
				t.Fatalf("address %s handed out to both %s and %s", a, o, hs[i].id)
			}
			seen[a.Addr()] = hs[i].id
			if !slices.Contains(hs[i].pool.Held(), a.Masked()) {
				t.Fatalf("host %s handed out %s outside its blocks %v", hs[i].id, a, hs[i].pool.Held())
			}
		}
	}
}

// TestAddsWriteNothingToEtcd: allocations from a held block, each flushed
// as an ADD's answer is, leave etcd's revision where it was; the mirror
// then copies all of them in one transaction, and the host's periodic
// check of its blocks writes nothing.
func TestAddsWriteNothingToEtcd(t *testing.T) {
	ctx := context.Background()
	cli := etcdtest.Start(t)
	store := etcd.NewStore(cli, "")
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.64.0.0/16"), BlockBits: 24, VNI: 1, Port: 4789}
	if _, err := store.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	h := newEtcdHost(t, store, n, "h1", t.TempDir(), ipam.Config{MaxBlocks: 4})
	if err := h.pool.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	revision := func() int64 {
		resp, err := cli.Get(ctx, "any")
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	before := revision()
	for i := range 50 {
		if _, err := h.pool.Allocate(ctx, overlay.AttachmentKey{ContainerID: fmt.Sprint("c", i), IfName: "eth0"}, overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
		if err := h.pool.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got := revision(); got != before {
		t.Fatalf("50 ADDs moved etcd's revision from %d to %d: an ADD wrote to etcd", before, got)
	}
	list, err := h.pool.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.leaser.Mirror(ctx, list); err != nil {
		t.Fatal(err)
	}
	if got := revision(); got != before+1 {
		t.Fatalf("mirroring 50 allocations moved the revision by %d, want one transaction", got-before)
	}
	mirrored := revision()
	h.pool.Verify(ctx)
	if got := revision(); got != mirrored {
		t.Fatalf("verifying the host's blocks moved the revision by %d: it wrote", got-mirrored)
	}
}
