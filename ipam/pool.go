// Package ipam grows and shrinks one host's share of a network's address
// space. The host allocates from the blocks it holds (its own record, see
// package ipam/local); before they fill up, the next block is claimed in
// the background (see package ipam/etcd), so that no ADD waits on etcd
// while a held block has a free address; a block that stays empty is given
// back; and a per-host cap keeps one host from taking the network.
package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/overlay"
)

// Leaser claims, checks and gives back the blocks of one host in the
// shared store (etcd.Pool).
type Leaser interface {
	// Held returns the blocks the host holds, sorted, without asking the
	// store.
	Held() []netip.Prefix
	// Claim claims one more block: want when it is valid (an error names
	// its owner when another host holds it), or else a free block for
	// which avoid is false. A network without a free block is an error
	// wrapping overlay.ErrPoolExhausted.
	Claim(ctx context.Context, want netip.Prefix, avoid func(netip.Prefix) bool) (netip.Prefix, error)
	// Give gives back a held block that has no address allocated. A block
	// that is no longer the host's is an error wrapping
	// overlay.ErrBlockLost.
	Give(ctx context.Context, b netip.Prefix) error
	// Verify reads the store and returns the held blocks that are no
	// longer the host's, dropping them from Held.
	Verify(ctx context.Context) ([]netip.Prefix, error)
}

// Book is the host's own record of its allocations (local.Allocator): it
// allocates from the blocks the usable function it was opened with
// returns, and calls that function with its lock held.
type Book interface {
	overlay.Allocator
	// Count returns how many addresses of block b are allocated.
	Count(b netip.Prefix) int
	// Stranded returns the allocations in blocks the host no longer holds.
	Stranded() []overlay.Allocation
}

// Defaults of Config.
const (
	// DefaultMaxBlocks is the default per-host cap: 16 blocks of /26 are
	// 976 containers.
	DefaultMaxBlocks = 16
	// DefaultIdleBlock is how long a block other than the host's last
	// stays empty before it is given back.
	DefaultIdleBlock = 10 * time.Minute
	// DefaultVerifyInterval is how often the host checks that its blocks
	// are still its own.
	DefaultVerifyInterval = time.Minute
)

// claimRetry is the longest wait before a failed background claim is
// tried again, spread down to half of it (claimRetryJitter).
const (
	claimRetry       = time.Second
	claimRetryJitter = 0.5
)

// Config configures a Pool.
type Config struct {
	// Network is the network whose addresses the pool hands out.
	Network overlay.Network
	// Host is this host.
	Host overlay.HostID
	// MaxBlocks caps the blocks the host holds; it must be at least 1.
	MaxBlocks int
	// LowWater is the number of free addresses below which the next block
	// is claimed in the background; 0 means a quarter of a block.
	LowWater int
	// IdleBlock is how long an empty block, other than the host's last,
	// is kept before it is given back; 0 means DefaultIdleBlock.
	IdleBlock time.Duration
	// VerifyInterval is how often the host checks its blocks in the
	// store; 0 means DefaultVerifyInterval.
	VerifyInterval time.Duration
	// Log receives the pool's log lines.
	Log *slog.Logger
}

// Validate reports whether c can be used, naming the field that is wrong.
func (c Config) Validate() error {
	if c.MaxBlocks < 1 {
		return fmt.Errorf("max blocks per host %d: want at least 1 (one block of /%d holds %d containers)", c.MaxBlocks, c.Network.BlockBits, c.Network.BlockCapacity())
	}
	if c.LowWater < 0 {
		return fmt.Errorf("low-water mark %d: want 0 (a quarter of a block) or more", c.LowWater)
	}
	return nil
}

// Stats counts what a Pool did since it started.
type Stats struct {
	// Claims counts blocks claimed, GiveBacks blocks given back.
	Claims, GiveBacks uint64
	// ClaimFailures counts claims that failed for another reason than a
	// full network.
	ClaimFailures uint64
	// Lost counts blocks found to be another host's or gone.
	Lost uint64
	// WaitedClaims counts the ADDs that found every held block full and
	// waited for a claim.
	WaitedClaims uint64
}

// Pool is one host's addresses in one network. It implements
// overlay.Allocator over the Book and claims blocks through the Leaser;
// Run does the background work. It is safe for concurrent use.
type Pool struct {
	cfg    Config
	leaser Leaser
	book   Book
	log    *slog.Logger

	grow chan struct{} // a background claim is wanted

	// claim is a token held by whoever claims or gives back a block, so
	// that the cap is never exceeded and a block being given back is
	// never allocated from.
	claim chan struct{}
	// claims counts successful claims: an ADD that waited for the token
	// sees whether a claim happened meanwhile.
	claims atomic.Uint64

	mu sync.Mutex // guards the fields below
	// retired are blocks being given back, or whose give-back may have
	// happened (the store did not answer): nothing is allocated from them,
	// and the give-back is tried again until the store answers.
	retired   map[netip.Prefix]bool
	emptyFrom map[netip.Prefix]time.Time
	full      bool // the last claim found the network without a free block
	stats     Stats
}

var _ overlay.Allocator = (*Pool)(nil)

// New returns the pool of cfg.Network. open opens the host's record,
// which allocates from the blocks usable returns (the held blocks but
// those being given back).
func New(cfg Config, leaser Leaser, open func(usable func() []netip.Prefix) (Book, error)) (*Pool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.LowWater == 0 {
		cfg.LowWater = max(1, cfg.Network.BlockCapacity()/4)
	}
	if cfg.IdleBlock <= 0 {
		cfg.IdleBlock = DefaultIdleBlock
	}
	if cfg.VerifyInterval <= 0 {
		cfg.VerifyInterval = DefaultVerifyInterval
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	p := &Pool{cfg: cfg, leaser: leaser, log: cfg.Log.With("network", cfg.Network.Name),
		grow: make(chan struct{}, 1), claim: make(chan struct{}, 1),
		retired: make(map[netip.Prefix]bool), emptyFrom: make(map[netip.Prefix]time.Time)}
	book, err := open(p.Held)
	if err != nil {
		return nil, err
	}
	p.book = book
	return p, nil
}

// Book returns the host's record the pool allocates through.
func (p *Pool) Book() Book { return p.book }

// Held returns the blocks addresses are allocated from: those the host
// holds, but a block being given back.
func (p *Pool) Held() []netip.Prefix {
	held := p.leaser.Held()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.retired) == 0 {
		return held
	}
	return slices.DeleteFunc(held, func(b netip.Prefix) bool { return p.retired[b] })
}

// Stats returns what the pool did since it started.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Free returns how many addresses of the usable blocks are free.
func (p *Pool) Free() int {
	free := 0
	for _, b := range p.Held() {
		free += max(0, p.cfg.Network.BlockCapacity()-p.book.Count(b))
	}
	return free
}

// Headroom returns how many addresses are free, and, when none is and no
// block can be claimed (the cap is reached or the last claim found the
// network full), an error wrapping overlay.ErrPoolExhausted that says
// which.
func (p *Pool) Headroom() (int, error) {
	free := p.Free()
	if free > 0 {
		return free, nil
	}
	return 0, p.cannotGrow()
}

// cannotGrow returns the error of a host that cannot claim a block, or
// nil when it can.
func (p *Pool) cannotGrow() error {
	n := p.cfg.Network
	held := len(p.leaser.Held())
	if held >= p.cfg.MaxBlocks {
		return fmt.Errorf("host %s holds %d blocks of network %s (%s, %d blocks of /%d), its cap (max blocks per host %d), and every address in them is in use: %w",
			p.cfg.Host, held, n.Name, n.CIDR, n.NumBlocks(), n.BlockBits, p.cfg.MaxBlocks, overlay.ErrPoolExhausted)
	}
	p.mu.Lock()
	full := p.full
	p.mu.Unlock()
	if full {
		return fmt.Errorf("network %s (%s, %d blocks of /%d) has no free block, and every address of the %d blocks host %s holds is in use (max blocks per host %d): %w",
			n.Name, n.CIDR, n.NumBlocks(), n.BlockBits, held, p.cfg.Host, p.cfg.MaxBlocks, overlay.ErrPoolExhausted)
	}
	return nil
}

// Allocate returns the address of key, allocating a free one with
// endpoint ep when key holds none. It waits on the store only when every
// held block is full.
func (p *Pool) Allocate(ctx context.Context, key overlay.AttachmentKey, ep overlay.Endpoint) (overlay.Allocation, error) {
	for {
		seen := p.claims.Load()
		al, err := p.book.Allocate(ctx, key, ep)
		if err == nil {
			if al.New {
				p.maybeGrow()
			}
			return al, nil
		}
		if !errors.Is(err, overlay.ErrPoolExhausted) {
			return al, err
		}
		if err := p.claimFor(ctx, seen); err != nil {
			return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, err)
		}
	}
}

// AllocateAddr gives key the address a (the CNI "ips" capability), with
// endpoint ep: from a
// held block, or from its block claimed for this host when no host holds
// it. An address outside the network, or in another host's block, is an
// error wrapping overlay.ErrConflict that names the owner.
func (p *Pool) AllocateAddr(ctx context.Context, key overlay.AttachmentKey, a netip.Addr, ep overlay.Endpoint) (overlay.Allocation, error) {
	n := p.cfg.Network
	if !a.Is4() || !n.CIDR.Contains(a) {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: the address is outside network %s (%s): %w", a, key, n.Name, n.CIDR, overlay.ErrConflict)
	}
	b := netip.PrefixFrom(a, n.BlockBits).Masked()
	if a == b.Addr() || a == overlay.Gateway(b) || a == overlay.Broadcast(b) {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: it is the network, gateway or broadcast address of block %s, not a container address: %w", a, key, b, overlay.ErrConflict)
	}
	if !slices.Contains(p.Held(), b) {
		if err := p.claimBlock(ctx, b); err != nil {
			return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: %w", a, key, err)
		}
	}
	al, err := p.book.AllocateAddr(ctx, key, a, ep)
	if err == nil && al.New {
		p.maybeGrow()
	}
	return al, err
}

// Release frees the address of key.
func (p *Pool) Release(ctx context.Context, key overlay.AttachmentKey) error {
	return p.book.Release(ctx, key)
}

// Flush returns once every decision made before it is durable.
func (p *Pool) Flush(ctx context.Context) error { return p.book.Flush(ctx) }

// Lookup returns the allocation of key.
func (p *Pool) Lookup(ctx context.Context, key overlay.AttachmentKey) (overlay.Allocation, error) {
	return p.book.Lookup(ctx, key)
}

// List returns every allocation on this host.
func (p *Pool) List(ctx context.Context) ([]overlay.Allocation, error) { return p.book.List(ctx) }

// lock takes the claim token, or fails when ctx is done first.
func (p *Pool) lock(ctx context.Context) error {
	select {
	case p.claim <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for a block claim: %w", ctx.Err())
	}
}

func (p *Pool) unlock() { <-p.claim }

// claimFor claims a block for an ADD that found every usable block full,
// unless a claim succeeded since it looked (seen), in which case it
// returns nil at once so that the ADD tries again.
func (p *Pool) claimFor(ctx context.Context, seen uint64) error {
	if err := p.lock(ctx); err != nil {
		return err
	}
	defer p.unlock()
	if p.claims.Load() != seen {
		return nil
	}
	p.mu.Lock()
	p.stats.WaitedClaims++
	p.mu.Unlock()
	if len(p.leaser.Held()) >= p.cfg.MaxBlocks {
		return p.cannotGrow()
	}
	// A network found full before may have blocks free again: try.
	_, err := p.claimLocked(ctx, netip.Prefix{})
	if errors.Is(err, overlay.ErrPoolExhausted) {
		if full := p.cannotGrow(); full != nil {
			return full
		}
	}
	return err
}

// claimBlock claims block b for a static address.
func (p *Pool) claimBlock(ctx context.Context, b netip.Prefix) error {
	if err := p.lock(ctx); err != nil {
		return err
	}
	defer p.unlock()
	p.mu.Lock()
	retired := p.retired[b]
	p.mu.Unlock()
	if retired {
		return fmt.Errorf("block %s is being given back by this host: try again", b)
	}
	if slices.Contains(p.leaser.Held(), b) {
		return nil
	}
	if held := len(p.leaser.Held()); held >= p.cfg.MaxBlocks {
		n := p.cfg.Network
		return fmt.Errorf("block %s is free but host %s holds %d blocks of network %s, its cap (max blocks per host %d): %w",
			b, p.cfg.Host, held, n.Name, p.cfg.MaxBlocks, overlay.ErrConflict)
	}
	_, err := p.claimLocked(ctx, b)
	if err != nil && !errors.Is(err, overlay.ErrPoolExhausted) {
		return fmt.Errorf("%w: %w", err, overlay.ErrConflict)
	}
	return err
}

// claimLocked claims want (or any free block), avoiding the blocks that
// hold stranded allocations: a block this host lost is never used again
// by it while a container still holds one of its old addresses. The
// claim token is held.
func (p *Pool) claimLocked(ctx context.Context, want netip.Prefix) (netip.Prefix, error) {
	stranded := make(map[netip.Prefix]bool)
	for _, al := range p.book.Stranded() {
		stranded[al.Addr.Masked()] = true
	}
	if stranded[want] {
		return netip.Prefix{}, fmt.Errorf("block %s holds addresses of containers this host had before it lost the block: recreate those containers first", want)
	}
	b, err := p.leaser.Claim(ctx, want, func(b netip.Prefix) bool { return stranded[b] })
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case errors.Is(err, overlay.ErrPoolExhausted):
		p.full = true
		return b, err
	case err != nil:
		p.stats.ClaimFailures++
		return b, err
	}
	p.full = false
	p.stats.Claims++
	p.claims.Add(1)
	p.log.Info("claimed a block", "block", b, "blocks", len(p.leaser.Held()))
	return b, nil
}

// Ensure claims a block when the host holds none, at start: the first
// ADD must not wait for one. Blocks with stranded allocations are
// avoided. A network without a free block is an error wrapping
// overlay.ErrPoolExhausted.
func (p *Pool) Ensure(ctx context.Context) error {
	if len(p.leaser.Held()) > 0 {
		return nil
	}
	if err := p.lock(ctx); err != nil {
		return err
	}
	defer p.unlock()
	if len(p.leaser.Held()) > 0 {
		return nil
	}
	_, err := p.claimLocked(ctx, netip.Prefix{})
	return err
}

// maybeGrow asks for a background claim when the free addresses are
// below the low-water mark.
func (p *Pool) maybeGrow() {
	if p.Free() < p.cfg.LowWater {
		select {
		case p.grow <- struct{}{}:
		default:
		}
	}
}

// Run does the pool's background work until ctx is done: it claims the
// next block when the free addresses fall below the low-water mark (or
// the host holds none), checks every VerifyInterval that the held blocks
// are still the host's, and gives back blocks that stayed empty for
// IdleBlock. It returns ctx's error.
func (p *Pool) Run(ctx context.Context) error {
	verify := time.NewTicker(p.cfg.VerifyInterval)
	defer verify.Stop()
	idle := time.NewTicker(min(max(p.cfg.IdleBlock/4, 100*time.Millisecond), time.Minute))
	defer idle.Stop()
	retry := time.NewTimer(0) // a first look at once
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.grow:
		case <-retry.C:
		case <-verify.C:
			p.Verify(ctx)
		case <-idle.C:
			p.GiveBackIdle(ctx, time.Now())
			continue
		}
		if err := p.Grow(ctx); err != nil && ctx.Err() == nil {
			retry.Reset(backoff.Jitter(claimRetry, claimRetryJitter, rand.Float64()))
		}
	}
}

// needsBlock reports whether the pool should claim a block: it holds
// none, or its free addresses are below the low-water mark, and the cap
// allows another.
func (p *Pool) needsBlock() bool {
	held := len(p.leaser.Held())
	return held < p.cfg.MaxBlocks && (held == 0 || p.Free() < p.cfg.LowWater)
}

// Grow claims blocks while the free addresses are below the low-water
// mark (or the host holds none) and the cap allows: Run's work when an
// ADD takes the free addresses below the mark. A full network is not an
// error; a claim that failed otherwise is, and Run tries again later.
func (p *Pool) Grow(ctx context.Context) error {
	for {
		if !p.needsBlock() {
			return nil
		}
		if err := p.lock(ctx); err != nil {
			return err
		}
		// Another claim (an ADD that found every block full) may have
		// happened while this one waited for the token.
		if !p.needsBlock() {
			p.unlock()
			return nil
		}
		_, err := p.claimLocked(ctx, netip.Prefix{})
		p.unlock()
		switch {
		case errors.Is(err, overlay.ErrPoolExhausted):
			return nil // logged by the ADD that needs it; retried on the next growth
		case err != nil:
			p.log.Warn("claiming the next block failed; retrying", "err", err)
			return err
		}
	}
}

// Verify checks that the held blocks are still the host's. A block that is
// not is logged at ERROR with the containers that hold its addresses, and
// counted; the pool claims another if it needs one.
func (p *Pool) Verify(ctx context.Context) {
	lost, err := p.leaser.Verify(ctx)
	p.mu.Lock()
	lost = slices.DeleteFunc(lost, func(b netip.Prefix) bool {
		if !p.retired[b] {
			return false
		}
		// A give-back whose answer was lost did happen.
		delete(p.retired, b)
		p.stats.GiveBacks++
		return true
	})
	p.mu.Unlock()
	if len(lost) == 0 {
		if err != nil {
			p.log.Warn("checking this host's blocks failed; will retry", "err", err)
		}
		return
	}
	p.mu.Lock()
	p.stats.Lost += uint64(len(lost))
	p.mu.Unlock()
	p.ReportStranded(lost)
	select {
	case p.grow <- struct{}{}:
	default:
	}
}

// ReportStranded logs at ERROR that blocks (nil: every block with a
// stranded allocation) are no longer this host's, naming the containers
// that still hold their addresses. It returns those allocations.
func (p *Pool) ReportStranded(blocks []netip.Prefix) []overlay.Allocation {
	all := blocks == nil
	named := make(map[netip.Prefix]bool)
	for _, b := range blocks {
		named[b] = true
	}
	var lost []overlay.Allocation
	for _, al := range p.book.Stranded() {
		b := al.Addr.Masked()
		if !named[b] {
			if !all {
				continue
			}
			named[b] = true
			blocks = append(blocks, b)
		}
		lost = append(lost, al)
	}
	if len(blocks) == 0 {
		return nil
	}
	containers := make([]string, 0, len(lost))
	for _, al := range lost {
		containers = append(containers, fmt.Sprintf("%s=%s", al.Key, al.Addr.Addr()))
	}
	p.log.Error("blocks of this host were reclaimed or removed while it was away: their containers' addresses may be handed out by other hosts, CHECK fails for them, recreate them",
		"blocks", blocks, "containers", containers)
	return lost
}

// GiveBackIdle gives back blocks that have been empty since IdleBlock
// before now, keeping at least one block and enough free addresses that
// the pool does not claim again at once; a block first seen empty is
// noted at now. It also tries again the give-backs whose outcome the
// store did not tell. Run calls it periodically with the time.
func (p *Pool) GiveBackIdle(ctx context.Context, now time.Time) {
	p.mu.Lock()
	retry := slices.Collect(maps.Keys(p.retired))
	p.mu.Unlock()
	for _, b := range retry {
		if err := p.giveBack(ctx, b); err != nil {
			p.log.Warn("giving back an empty block failed; will retry", "block", b, "err", err)
		}
	}
	held := p.Held()
	// The counts before p.mu: the book calls Held, which takes p.mu, with
	// its own lock held, so taking the book's lock under p.mu could
	// deadlock with an ADD.
	used := make(map[netip.Prefix]bool, len(held))
	for _, b := range held {
		used[b] = p.book.Count(b) > 0
	}
	p.mu.Lock()
	for b := range p.emptyFrom {
		if !slices.Contains(held, b) {
			delete(p.emptyFrom, b)
		}
	}
	var idle []netip.Prefix
	for _, b := range held {
		if used[b] {
			delete(p.emptyFrom, b)
			continue
		}
		since, ok := p.emptyFrom[b]
		if !ok {
			p.emptyFrom[b] = now
			continue
		}
		if now.Sub(since) >= p.cfg.IdleBlock {
			idle = append(idle, b)
		}
	}
	p.mu.Unlock()
	// The highest blocks first: allocation fills the lowest.
	slices.Reverse(idle)
	for _, b := range idle {
		if len(p.Held()) <= 1 || p.Free()-p.cfg.Network.BlockCapacity() < p.cfg.LowWater {
			return
		}
		if err := p.giveBack(ctx, b); err != nil {
			p.log.Warn("giving back an empty block failed; will retry", "block", b, "err", err)
		}
	}
}

// giveBack gives back block b if it is still empty. When the store does
// not answer, b stays retired, to be tried again: the give-back may have
// happened.
func (p *Pool) giveBack(ctx context.Context, b netip.Prefix) error {
	if err := p.lock(ctx); err != nil {
		return err
	}
	defer p.unlock()
	p.mu.Lock()
	again := p.retired[b]
	p.retired[b] = true
	p.mu.Unlock()
	// Every allocation that saw b usable has finished deciding once Count
	// has taken the book's lock: if none landed in b, none will.
	if !again && p.book.Count(b) > 0 {
		p.mu.Lock()
		delete(p.retired, b)
		p.mu.Unlock()
		return nil
	}
	err := p.leaser.Give(ctx, b)
	if err != nil && !errors.Is(err, overlay.ErrBlockLost) {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.retired, b)
	delete(p.emptyFrom, b)
	p.stats.GiveBacks++
	p.log.Info("gave back an empty block", "block", b, "idle", p.cfg.IdleBlock)
	return nil
}
