package ipam_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
)

// world is an in-memory block store shared by the fake leasers of several
// hosts: what etcd is to etcd.Pool.
type world struct {
	net overlay.Network

	mu     sync.Mutex
	owners map[netip.Prefix]overlay.HostID
	err    error // every call fails with it, as etcd down would
	claims int   // calls of Claim that reached the store
}

func newWorld(cidr string) *world {
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix(cidr), BlockBits: 26, VNI: 1, Port: 4789}
	return &world{net: n, owners: make(map[netip.Prefix]overlay.HostID)}
}

func (w *world) setErr(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.err = err
}

func (w *world) owner(b netip.Prefix) overlay.HostID {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.owners[b]
}

// leaser is one host's fake ipam.Leaser over a world.
type leaser struct {
	w    *world
	host overlay.HostID

	mu   sync.Mutex
	held map[netip.Prefix]bool
}

func (l *leaser) Held() []netip.Prefix {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]netip.Prefix, 0, len(l.held))
	for b := range l.held {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

func (l *leaser) Claim(_ context.Context, want netip.Prefix, avoid func(netip.Prefix) bool) (netip.Prefix, error) {
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	if l.w.err != nil {
		return netip.Prefix{}, l.w.err
	}
	l.w.claims++
	take := func(b netip.Prefix) netip.Prefix {
		l.w.owners[b] = l.host
		l.mu.Lock()
		l.held[b] = true
		l.mu.Unlock()
		return b
	}
	if want.IsValid() {
		if o, ok := l.w.owners[want]; ok && o != l.host {
			return netip.Prefix{}, fmt.Errorf("block %s is held by host %s", want, o)
		}
		return take(want), nil
	}
	for i := range l.w.net.NumBlocks() {
		b := l.w.net.Block(i)
		if _, taken := l.w.owners[b]; !taken && (avoid == nil || !avoid(b)) {
			return take(b), nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("no free block: %w", overlay.ErrPoolExhausted)
}

func (l *leaser) Give(_ context.Context, b netip.Prefix) error {
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	if l.w.err != nil {
		return l.w.err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.held, b)
	if l.w.owners[b] != l.host {
		return overlay.ErrBlockLost
	}
	delete(l.w.owners, b)
	return nil
}

func (l *leaser) Verify(context.Context) ([]netip.Prefix, error) {
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	if l.w.err != nil {
		return nil, l.w.err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var lost []netip.Prefix
	for b := range l.held {
		if l.w.owners[b] != l.host {
			delete(l.held, b)
			lost = append(lost, b)
		}
	}
	if len(lost) > 0 {
		return lost, overlay.ErrBlockLost
	}
	return nil, nil
}

// host is one simulated host: its pool over the world and its own record.
type host struct {
	pool   *ipam.Pool
	leaser *leaser
	log    *logBuffer
}

// logBuffer keeps the log lines a pool writes.
type logBuffer struct {
	mu sync.Mutex
	sb strings.Builder
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sb.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sb.String()
}

func newHost(t *testing.T, w *world, name overlay.HostID, dir string, cfg ipam.Config) *host {
	t.Helper()
	h := newHostCfg(t, w, name, dir, cfg)
	if err := h.pool.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	return h
}

func newHostNoEnsure(t *testing.T, w *world, name overlay.HostID, dir string) *host {
	return newHostCfg(t, w, name, dir, ipam.Config{})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func newHostCfg(t *testing.T, w *world, name overlay.HostID, dir string, cfg ipam.Config) *host {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	db, err := local.Open(filepath.Join(dir, "alloc.db"), name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	l := &leaser{w: w, host: name, held: make(map[netip.Prefix]bool)}
	w.mu.Lock()
	for b, o := range w.owners {
		if o == name {
			l.held[b] = true
		}
	}
	w.mu.Unlock()
	buf := &logBuffer{}
	cfg.Network, cfg.Host = w.net, name
	if cfg.MaxBlocks == 0 {
		cfg.MaxBlocks = 16
	}
	cfg.Log = slog.New(slog.NewTextHandler(buf, nil))
	p, err := ipam.New(cfg, l, func(usable func() []netip.Prefix) (ipam.Book, error) {
		a, _, err := db.Allocator(w.net, name, usable)
		return a, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return &host{pool: p, leaser: l, log: buf}
}

func key(i int) overlay.AttachmentKey {
	return overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%03d", i), IfName: "eth0"}
}

// run runs the pool's background loop for the rest of the test.
func run(t *testing.T, p *ipam.Pool) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestGrowsBeforeFull: crossing the low-water mark claims the next block
// in the background, so the ADDs that fill the first block and start the
// second never wait for a claim.
func TestGrowsBeforeFull(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/24")
	h := newHost(t, w, "a", "", ipam.Config{})
	run(t, h.pool)
	if got := len(h.pool.Held()); got != 1 {
		t.Fatalf("holds %d blocks at start, want 1", got)
	}
	// 61 addresses a block, low water 15: the 47th ADD leaves 14 free.
	for i := range 47 {
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a second block", func() bool { return len(h.pool.Held()) == 2 })
	for i := 47; i < 100; i++ {
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	if st := h.pool.Stats(); st.WaitedClaims != 0 || st.Claims != 2 {
		t.Fatalf("stats %+v: want 2 claims (the first at start) and no ADD waiting for one", st)
	}
	list, _ := h.pool.List(ctx)
	blocks := map[netip.Prefix]int{}
	for _, al := range list {
		blocks[al.Addr.Masked()]++
	}
	if len(blocks) != 2 || blocks[h.pool.Held()[0]] != 61 {
		t.Fatalf("addresses by block %v: want the first block full before the second is used", blocks)
	}
}

// TestWaitsForClaimOnlyWhenFull: without the background loop (or before
// it runs), the ADD that finds every block full waits for a claim and
// gets an address from the new block.
func TestWaitsForClaimOnlyWhenFull(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/24")
	h := newHost(t, w, "a", "", ipam.Config{})
	for i := range 61 {
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	if st := h.pool.Stats(); st.WaitedClaims != 0 {
		t.Fatalf("an ADD waited while the block had room: %+v", st)
	}
	al, err := h.pool.Allocate(ctx, key(61), overlay.Endpoint{})
	if err != nil {
		t.Fatal(err)
	}
	held := h.pool.Held()
	if len(held) != 2 || al.Addr.Masked() != held[1] {
		t.Fatalf("62nd address %s, blocks %v: want it in a second block", al.Addr, held)
	}
	if st := h.pool.Stats(); st.WaitedClaims != 1 {
		t.Fatalf("stats %+v: want one ADD that waited", st)
	}
}

// TestCap: a host at its cap whose blocks are full gets an error naming
// the network, its size and the cap, and Headroom says the same.
func TestCap(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/22")
	h := newHost(t, w, "a", "", ipam.Config{MaxBlocks: 2})
	run(t, h.pool)
	for i := range 122 {
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatalf("ADD %d: %v", i, err)
		}
	}
	_, err := h.pool.Allocate(ctx, key(122), overlay.Endpoint{})
	if !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("ADD past the cap = %v, want ErrPoolExhausted", err)
	}
	for _, want := range []string{"network default", "198.19.0.0/22", "16 blocks of /26", "cap", "2"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if free, err := h.pool.Headroom(); free != 0 || !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("Headroom = %d, %v", free, err)
	}
	if n := len(h.leaser.Held()); n != 2 {
		t.Fatalf("holds %d blocks, cap 2", n)
	}
	// Releasing one address makes room again.
	if err := h.pool.Release(ctx, key(5)); err != nil {
		t.Fatal(err)
	}
	if free, err := h.pool.Headroom(); free != 1 || err != nil {
		t.Fatalf("Headroom after a release = %d, %v", free, err)
	}
}

// TestNetworkFull: when no block is free, the ADD that finds its blocks
// full is told the network is full, with its size.
func TestNetworkFull(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/25") // two blocks
	a := newHost(t, w, "a", "", ipam.Config{})
	newHost(t, w, "b", "", ipam.Config{})
	for i := range 61 {
		if _, err := a.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := a.pool.Allocate(ctx, key(61), overlay.Endpoint{})
	if !errors.Is(err, overlay.ErrPoolExhausted) || !strings.Contains(err.Error(), "no free block") || !strings.Contains(err.Error(), "2 blocks of /26") {
		t.Fatalf("ADD in a full network = %v", err)
	}
	if _, err := a.pool.Headroom(); err == nil || !strings.Contains(err.Error(), "no free block") {
		t.Fatalf("Headroom in a full network = %v", err)
	}
	if c := (ipam.Config{MaxBlocks: 0}); c.Validate() == nil {
		t.Fatal("a cap of 0 blocks is valid")
	}
}

// TestGivesBackIdleBlocks: a block that stays empty for the idle period
// is given back, unless it is the host's last, or giving it back would
// leave fewer free addresses than the low-water mark.
func TestGivesBackIdleBlocks(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/22")
	h := newHost(t, w, "a", "", ipam.Config{IdleBlock: 50 * time.Millisecond})
	for i := range 62 { // the 62nd in a second block
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	held := h.pool.Held()
	if len(held) != 2 {
		t.Fatalf("blocks %v", held)
	}
	run(t, h.pool)
	// The second block is in use: it stays.
	time.Sleep(200 * time.Millisecond)
	if len(h.pool.Held()) != 2 {
		t.Fatal("a block in use was given back")
	}
	for i := range 62 {
		if err := h.pool.Release(ctx, key(i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the idle block given back", func() bool { return len(h.pool.Held()) == 1 })
	if w.owner(held[1]) != "" {
		t.Fatalf("block %s still owned by %s in the store", held[1], w.owner(held[1]))
	}
	time.Sleep(200 * time.Millisecond)
	if got := h.pool.Held(); len(got) != 1 || got[0] != held[0] {
		t.Fatalf("blocks %v: the host's last block must stay", got)
	}
	if st := h.pool.Stats(); st.GiveBacks != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestGiveBackRetriedWhenStoreDown: a give-back the store did not answer
// leaves the block out of allocation until the store answers.
func TestGiveBackRetriedWhenStoreDown(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/22")
	h := newHost(t, w, "a", "", ipam.Config{IdleBlock: 20 * time.Millisecond})
	for i := range 62 {
		if _, err := h.pool.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	second := h.pool.Held()[1]
	for i := range 62 {
		h.pool.Release(ctx, key(i))
	}
	w.setErr(errors.New("etcd down"))
	run(t, h.pool)
	waitFor(t, "a failed give-back", func() bool { return strings.Contains(h.log.String(), "giving back an empty block failed") })
	if slices.Contains(h.pool.Held(), second) {
		t.Fatal("a block whose give-back failed is allocated from")
	}
	w.setErr(nil)
	waitFor(t, "the give-back retried", func() bool { return w.owner(second) == "" && h.pool.Stats().GiveBacks == 1 })
}

// TestStaticAddress: a static address is honoured in a held block and in
// a free one (claimed for it), and refused, naming the owner, in another
// host's block or outside the network.
func TestStaticAddress(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/22")
	a := newHost(t, w, "a", "", ipam.Config{})
	b := newHost(t, w, "b", "", ipam.Config{})
	ba := b.pool.Held()[0]
	aa := a.pool.Held()[0]

	if al, err := a.pool.AllocateAddr(ctx, key(1), aa.Addr().Next().Next(), overlay.Endpoint{}); err != nil || al.Addr.Addr() != aa.Addr().Next().Next() {
		t.Fatalf("static address in a held block: %v, %v", al, err)
	}
	free := netip.MustParsePrefix("198.19.3.192/26")
	if w.owner(free) != "" {
		t.Fatalf("test assumes %s is free", free)
	}
	want := netip.MustParseAddr("198.19.3.200")
	al, err := a.pool.AllocateAddr(ctx, key(2), want, overlay.Endpoint{})
	if err != nil || al.Addr.Addr() != want || w.owner(free) != "a" {
		t.Fatalf("static address in a free block: %v, %v (owner %q)", al, err, w.owner(free))
	}
	_, err = a.pool.AllocateAddr(ctx, key(3), ba.Addr().Next().Next(), overlay.Endpoint{})
	if !errors.Is(err, overlay.ErrConflict) || !strings.Contains(err.Error(), "host b") {
		t.Fatalf("static address in b's block = %v; want ErrConflict naming host b", err)
	}
	_, err = a.pool.AllocateAddr(ctx, key(4), netip.MustParseAddr("10.1.2.3"), overlay.Endpoint{})
	if !errors.Is(err, overlay.ErrConflict) || !strings.Contains(err.Error(), "outside network default") {
		t.Fatalf("static address outside the network = %v", err)
	}
	unclaimed := netip.MustParsePrefix("198.19.2.0/26")
	for _, b := range []netip.Prefix{free, unclaimed} {
		for _, gw := range []netip.Addr{b.Addr(), overlay.Gateway(b), overlay.Broadcast(b)} {
			if _, err := a.pool.AllocateAddr(ctx, key(5), gw, overlay.Endpoint{}); !errors.Is(err, overlay.ErrConflict) {
				t.Errorf("static %s (network, gateway or broadcast) = %v", gw, err)
			}
		}
	}
	if o := w.owner(unclaimed); o != "" {
		t.Errorf("a refused static address claimed its block for %s", o)
	}
}

// strand gives key(1) an address of h's first block, durably, and then
// frees that block in the store behind h's back, as a reclaim would. It
// returns the block and the allocation.
func strand(t *testing.T, w *world, h *host) (netip.Prefix, overlay.Allocation) {
	t.Helper()
	ctx := context.Background()
	b := h.pool.Held()[0]
	al, err := h.pool.Allocate(ctx, key(1), overlay.Endpoint{})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.pool.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	delete(w.owners, b)
	w.mu.Unlock()
	return b, al
}

// TestLostBlock: a block found to be another host's is dropped, logged at
// ERROR with its containers, counted; its allocations are stranded (CHECK
// fails), the host claims a new block that is never the lost one, and the
// stranded address is freed by its DEL.
func TestLostBlock(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/25") // two blocks: the lost one is free again, tempting
	dir := t.TempDir()
	h := newHost(t, w, "a", dir, ipam.Config{})
	old, al := strand(t, w, h)
	h.pool.Verify(ctx)
	if st := h.pool.Stats(); st.Lost != 1 {
		t.Fatalf("stats %+v", st)
	}
	logs := h.log.String()
	if !strings.Contains(logs, "level=ERROR") || !strings.Contains(logs, old.String()) || !strings.Contains(logs, "c001/eth0="+al.Addr.Addr().String()) {
		t.Fatalf("no ERROR naming the block and its container:\n%s", logs)
	}
	if _, err := h.pool.Lookup(ctx, key(1)); !errors.Is(err, overlay.ErrConflict) || !strings.Contains(err.Error(), "recreate the container") {
		t.Fatalf("Lookup of a stranded container = %v", err)
	}
	if err := h.pool.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if got := h.pool.Held(); len(got) != 1 || got[0] == old {
		t.Fatalf("after losing %s the host holds %v: want another block", old, got)
	}
	if err := h.pool.Release(ctx, key(1)); err != nil {
		t.Fatal(err)
	}
	if s := h.pool.Book().Stranded(); len(s) != 0 {
		t.Fatalf("stranded after DEL: %v", s)
	}
}

// TestReturningHostAvoidsItsOldBlocks: a host that restarts to find its
// block gone reports its stranded containers and claims another block.
func TestReturningHostAvoidsItsOldBlocks(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/25")
	dir := t.TempDir()
	h := newHost(t, w, "a", dir, ipam.Config{})
	old, _ := strand(t, w, h)
	// Closing the file is the test's cleanup; a second pool on another
	// copy of it stands for the restarted host.
	t2 := t.TempDir()
	copyFile(t, filepath.Join(dir, "alloc.db"), filepath.Join(t2, "alloc.db"))
	h2 := newHostNoEnsure(t, w, "a", t2)
	lost := h2.pool.ReportStranded(nil)
	if len(lost) != 1 || lost[0].Key != key(1) {
		t.Fatalf("stranded at start: %v", lost)
	}
	if err := h2.pool.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if got := h2.pool.Held(); len(got) != 1 || got[0] == old {
		t.Fatalf("the returning host holds %v: want a block other than %s", got, old)
	}
}

// TestConcurrentAllocations: 64 ADDs at once across block boundaries never
// share an address, and the host stays within its cap.
func TestConcurrentAllocations(t *testing.T) {
	ctx := context.Background()
	w := newWorld("198.19.0.0/20")
	h := newHost(t, w, "a", "", ipam.Config{MaxBlocks: 5})
	run(t, h.pool)
	var wg sync.WaitGroup
	results := make([]overlay.Allocation, 300)
	errs := make([]error, 300)
	for g := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < 300; i += 64 {
				results[i], errs[i] = h.pool.Allocate(ctx, key(i), overlay.Endpoint{})
			}
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]int{}
	for i, al := range results {
		if errs[i] != nil {
			t.Fatalf("ADD %d: %v", i, errs[i])
		}
		if j, dup := seen[al.Addr.Addr()]; dup {
			t.Fatalf("%s given to %d and %d", al.Addr, j, i)
		}
		seen[al.Addr.Addr()] = i
	}
	if n := len(h.leaser.Held()); n > 5 {
		t.Fatalf("holds %d blocks, cap 5", n)
	}
}
