package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// ErrBlockLost is returned by Renew when a block this host held is now
// owned by another host or was deleted.
var ErrBlockLost = errors.New("etcd: block lost")

// maxTxnRetries bounds how often one operation retries a transaction that
// lost a race before giving up.
const maxTxnRetries = 5

// BlockRecord is the value of a block's key: who owns it and since when.
// A block has no etcd lease: it stays with its owner through etcd outages
// and overlayd restarts, and is given back only by an explicit release.
type BlockRecord struct {
	// Host owns the block.
	Host overlay.HostID `json:"host"`
	// Claimed is when the host claimed the block.
	Claimed time.Time `json:"claimed"`
	// Renewed is when the host last confirmed it still holds the block.
	Renewed time.Time `json:"renewed"`
}

// AddrRecord is the value of an address's key: who holds it.
type AddrRecord struct {
	// Host is the host whose block the address belongs to.
	Host overlay.HostID `json:"host"`
	// ContainerID is the runtime's ID of the container.
	ContainerID string `json:"containerID"`
	// IfName is the interface name inside the container.
	IfName string `json:"ifName"`
}

// held is a block this host owns, with the revisions that prove it.
type held struct {
	createRev int64 // create revision of the block key: changes only if it is re-claimed
	modRev    int64 // last modification revision seen: the compare of a renewal
}

// Pool is one host's view of one network: it leases the host's blocks and
// allocates addresses from them. It implements overlay.BlockLeaser and
// overlay.Allocator and is safe for concurrent use.
type Pool struct {
	s    *Store
	net  overlay.Network
	host overlay.HostID

	allocMu sync.Mutex // serializes this host's allocations, so they never race each other
	// Guarded by allocMu: what this host's allocations look like in etcd,
	// kept so that an allocation needs one transaction, not three round
	// trips. Only this host allocates from its blocks; the transaction's
	// compares still decide, so a stale cache costs a retry, never a
	// duplicate.
	cached   bool                                   // attach and used have been read
	attach   map[overlay.AttachmentKey]netip.Prefix // this host's allocations
	usedAddr map[netip.Addr]bool                    // addresses taken in held blocks

	mu   sync.Mutex // guards held
	held map[netip.Prefix]held
}

var (
	_ overlay.BlockLeaser = (*Pool)(nil)
	_ overlay.Allocator   = (*Pool)(nil)
)

// Pool returns host's pool of network n.
func (s *Store) Pool(n overlay.Network, host overlay.HostID) *Pool {
	return &Pool{s: s, net: n, host: host, held: make(map[netip.Prefix]held)}
}

// Owners returns the owner of every claimed block of the network.
func (p *Pool) Owners(ctx context.Context) (map[netip.Prefix]overlay.HostID, error) {
	recs, err := p.blocks(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Prefix]overlay.HostID, len(recs))
	for b, r := range recs {
		out[b] = r.rec.Host
	}
	return out, nil
}

type blockKV struct {
	rec       BlockRecord
	createRev int64
	modRev    int64
}

func (p *Pool) blocks(ctx context.Context) (map[netip.Prefix]blockKV, error) {
	prefix := p.s.blocksPrefix(p.net.Name)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list blocks of %s: %w", p.net.Name, err)
	}
	out := make(map[netip.Prefix]blockKV, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		b, err := parseBlockName(strings.TrimPrefix(string(kv.Key), prefix))
		if err != nil || p.net.BlockIndex(b) < 0 {
			continue // not ours to interpret; never treat it as free either
		}
		var rec BlockRecord
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			// Undecodable: keep the block taken by an unknown owner so
			// that nobody claims it over a record we cannot read.
			rec.Host = "?"
		}
		out[b] = blockKV{rec: rec, createRev: kv.CreateRevision, modRev: kv.ModRevision}
	}
	return out, nil
}

// Held returns the blocks this pool knows it holds, sorted.
func (p *Pool) Held() []netip.Prefix { return sortedBlocks(p.heldCopy()) }

func sortedBlocks(m map[netip.Prefix]held) []netip.Prefix {
	return slices.SortedFunc(maps.Keys(m), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
}

// Lease returns the blocks the host holds, claiming a free one when it
// holds none. A restarted host gets the same blocks back. Hosts racing for
// blocks each try a random free one; a claim is a transaction that
// succeeds only when the block's key does not exist, so no block ever has
// two owners.
func (p *Pool) Lease(ctx context.Context) ([]netip.Prefix, error) {
	// The blocks may change: the allocation cache is read again after.
	defer p.invalidate()
	recs, err := p.blocks(ctx)
	if err != nil {
		return nil, fmt.Errorf("lease block for %s: %w", p.host, err)
	}
	p.mu.Lock()
	for b, r := range recs {
		if r.rec.Host == p.host {
			p.held[b] = held{createRev: r.createRev, modRev: r.modRev}
		}
	}
	n := len(p.held)
	p.mu.Unlock()
	if n > 0 {
		return p.Held(), nil
	}

	var free []netip.Prefix
	for i := range p.net.NumBlocks() {
		b := p.net.Block(i)
		if _, taken := recs[b]; !taken {
			free = append(free, b)
		}
	}
	now := time.Now().UTC()
	val, err := json.Marshal(BlockRecord{Host: p.host, Claimed: now, Renewed: now})
	if err != nil {
		return nil, fmt.Errorf("encode block record: %w", err)
	}
	for len(free) > 0 {
		i := rand.IntN(len(free))
		b := free[i]
		key := p.s.blockKey(p.net.Name, b)
		resp, err := p.s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(val))).
			Commit()
		if err != nil {
			return nil, fmt.Errorf("lease block %s for %s: %w", b, p.host, err)
		}
		if resp.Succeeded {
			rev := resp.Header.Revision
			p.mu.Lock()
			p.held[b] = held{createRev: rev, modRev: rev}
			p.mu.Unlock()
			return []netip.Prefix{b}, nil
		}
		// Another host won this one: try another.
		free[i] = free[len(free)-1]
		free = free[:len(free)-1]
	}
	return nil, fmt.Errorf("lease block for %s in %s (%s, /%d blocks): %w", p.host, p.net.Name, p.net.CIDR, p.net.BlockBits, overlay.ErrPoolExhausted)
}

// Renew confirms every held block with a compare-and-swap on its last
// known revision: it never overwrites a record it has not read. A block
// now owned by another host, or deleted, is dropped from the pool and
// reported with ErrBlockLost.
func (p *Pool) Renew(ctx context.Context) error {
	var errs []error
	for b, h := range p.heldCopy() {
		key := p.s.blockKey(p.net.Name, b)
		for attempt := 0; ; attempt++ {
			resp, err := p.s.cli.Get(ctx, key)
			if err != nil {
				errs = append(errs, fmt.Errorf("renew block %s: %w", b, err))
				break
			}
			var rec BlockRecord
			if len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != h.createRev ||
				json.Unmarshal(resp.Kvs[0].Value, &rec) != nil || rec.Host != p.host {
				p.mu.Lock()
				delete(p.held, b)
				p.mu.Unlock()
				errs = append(errs, fmt.Errorf("renew block %s for %s: %w", b, p.host, ErrBlockLost))
				break
			}
			kv := resp.Kvs[0]
			rec.Renewed = time.Now().UTC()
			val, err := json.Marshal(rec)
			if err != nil {
				errs = append(errs, fmt.Errorf("renew block %s: encode: %w", b, err))
				break
			}
			tr, err := p.s.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
				Then(clientv3.OpPut(key, string(val))).
				Commit()
			if err != nil {
				errs = append(errs, fmt.Errorf("renew block %s: %w", b, err))
				break
			}
			if tr.Succeeded {
				p.mu.Lock()
				p.held[b] = held{createRev: h.createRev, modRev: tr.Header.Revision}
				p.mu.Unlock()
				break
			}
			if attempt >= maxTxnRetries {
				errs = append(errs, fmt.Errorf("renew block %s: record keeps changing", b))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// ReleaseBlocks gives back every block the host owns, with every address
// allocated from them and the host's attachment index, in one
// transaction: it happens whole or not at all.
func (p *Pool) ReleaseBlocks(ctx context.Context) error {
	for attempt := 0; attempt <= maxTxnRetries; attempt++ {
		recs, err := p.blocks(ctx)
		if err != nil {
			return fmt.Errorf("release blocks of %s: %w", p.host, err)
		}
		var cmps []clientv3.Cmp
		ops := []clientv3.Op{clientv3.OpDelete(p.s.attachPrefix(p.net.Name, p.host), clientv3.WithPrefix())}
		for b, r := range recs {
			if r.rec.Host != p.host {
				continue
			}
			key := p.s.blockKey(p.net.Name, b)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", r.createRev))
			ops = append(ops,
				clientv3.OpDelete(p.s.addrsPrefix(p.net.Name, b), clientv3.WithPrefix()),
				clientv3.OpDelete(key))
		}
		resp, err := p.s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return fmt.Errorf("release blocks of %s: %w", p.host, err)
		}
		if resp.Succeeded {
			p.mu.Lock()
			clear(p.held)
			p.mu.Unlock()
			p.invalidate()
			return nil
		}
	}
	return fmt.Errorf("release blocks of %s: blocks keep changing: %w", p.host, overlay.ErrConflict)
}

// Allocate returns the address of key, allocating the lowest free address
// of the host's blocks when key holds none. The address key and the
// attachment key are created in one transaction that also checks the
// block is still the host's, so an address is never given twice.
func (p *Pool) Allocate(ctx context.Context, key overlay.AttachmentKey) (overlay.Allocation, error) {
	p.allocMu.Lock()
	defer p.allocMu.Unlock()
	if err := p.loadLocked(ctx); err != nil {
		return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, err)
	}
	blocks := p.heldCopy()
	if al, ok, err := p.cachedLocked(key, blocks); ok || err != nil {
		return al, err
	}
	if len(blocks) == 0 {
		return overlay.Allocation{}, fmt.Errorf("allocate %s: host %s holds no block of %s: %w", key, p.host, p.net.Name, overlay.ErrPoolExhausted)
	}
	// Scan the cache; if it says every address is taken and was not read
	// in this call, read etcd once more before saying so.
	for pass := 0; pass < 2; pass++ {
		reloaded := false
		blocks = p.heldCopy() // less any block the last pass found lost
		for _, b := range sortedBlocks(blocks) {
			h := blocks[b]
			for a := overlay.Gateway(b).Next(); a != overlay.Broadcast(b); a = a.Next() {
				if p.usedAddr[a] {
					continue
				}
				al, won, err := p.claim(ctx, key, b, h, a)
				if err != nil || won {
					return al, err
				}
				// Lost a race with something outside this pool: the key
				// or the address exists in etcd, or the block is no
				// longer ours. Read etcd again and carry on.
				p.cached, reloaded = false, true
				if err := p.loadLocked(ctx); err != nil {
					return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, err)
				}
				if al, ok, err := p.cachedLocked(key, blocks); ok || err != nil {
					return al, err
				}
				if !p.stillHeld(ctx, b, h) {
					break
				}
			}
		}
		if reloaded {
			break
		}
		p.cached = false
		if err := p.loadLocked(ctx); err != nil {
			return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, err)
		}
	}
	return overlay.Allocation{}, fmt.Errorf("allocate %s: every address of %s's blocks %v is in use: %w", key, p.host, p.Held(), overlay.ErrPoolExhausted)
}

// AllocateAddr gives key the address a, which must be a free address of
// one of the host's blocks (the CNI "ips" capability). A key that already
// holds a gets it again; one that holds another address, or an address
// that is taken or outside the host's blocks, is an error wrapping
// overlay.ErrConflict.
func (p *Pool) AllocateAddr(ctx context.Context, key overlay.AttachmentKey, a netip.Addr) (overlay.Allocation, error) {
	p.allocMu.Lock()
	defer p.allocMu.Unlock()
	if err := p.loadLocked(ctx); err != nil {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: %w", a, key, err)
	}
	blocks := p.heldCopy()
	al, ok, err := p.cachedLocked(key, blocks)
	switch {
	case err != nil:
		return overlay.Allocation{}, err
	case ok && al.Addr.Addr() == a:
		return al, nil
	case ok:
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: it already holds %s: %w", a, key, al.Addr, overlay.ErrConflict)
	}
	b := netip.PrefixFrom(a, p.net.BlockBits).Masked()
	h, ok := blocks[b]
	if !ok || a == b.Addr() || a == overlay.Gateway(b) || a == overlay.Broadcast(b) {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: not a container address of this host's blocks %v: %w", a, key, p.Held(), overlay.ErrConflict)
	}
	al, won, err := p.claim(ctx, key, b, h, a)
	if err != nil || won {
		return al, err
	}
	return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: the address is in use: %w", a, key, overlay.ErrConflict)
}

// claim tries to give key address a of block b in one transaction, which
// fails (won is false) when the address or the key is taken or the block
// was re-claimed.
func (p *Pool) claim(ctx context.Context, key overlay.AttachmentKey, b netip.Prefix, h held, a netip.Addr) (al overlay.Allocation, won bool, err error) {
	rec, err := json.Marshal(AddrRecord{Host: p.host, ContainerID: key.ContainerID, IfName: key.IfName})
	if err != nil {
		return al, false, fmt.Errorf("encode address record: %w", err)
	}
	addr := netip.PrefixFrom(a, b.Bits())
	addrKey := p.s.addrsPrefix(p.net.Name, b) + a.String()
	akey := p.s.attachKey(p.net.Name, p.host, key)
	resp, err := p.s.cli.Txn(ctx).
		If(
			clientv3.Compare(clientv3.CreateRevision(p.s.blockKey(p.net.Name, b)), "=", h.createRev),
			clientv3.Compare(clientv3.CreateRevision(addrKey), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(akey), "=", 0),
		).
		Then(clientv3.OpPut(addrKey, string(rec)), clientv3.OpPut(akey, addr.String())).
		Commit()
	if err != nil {
		return al, false, fmt.Errorf("allocate %s for %s: %w", a, key, err)
	}
	if !resp.Succeeded {
		return al, false, nil
	}
	p.attach[key] = addr
	p.usedAddr[a] = true
	return overlay.Allocation{Key: key, Addr: addr, Host: p.host, New: true}, true, nil
}

// invalidate makes the next allocation read etcd again.
func (p *Pool) invalidate() {
	p.allocMu.Lock()
	p.cached = false
	p.allocMu.Unlock()
}

// loadLocked reads this host's allocations and the used addresses of its
// blocks into the cache, unless it is loaded already. p.allocMu is held.
func (p *Pool) loadLocked(ctx context.Context) error {
	if p.cached {
		return nil
	}
	list, err := p.List(ctx)
	if err != nil {
		return err
	}
	attach := make(map[overlay.AttachmentKey]netip.Prefix, len(list))
	for _, al := range list {
		attach[al.Key] = al.Addr
	}
	used := make(map[netip.Addr]bool)
	for _, b := range p.Held() {
		u, err := p.used(ctx, b)
		if err != nil {
			return err
		}
		for a := range u {
			used[a] = true
		}
	}
	p.attach, p.usedAddr, p.cached = attach, used, true
	return nil
}

// cachedLocked returns key's allocation from the cache, if it has one;
// one in a block this host no longer holds is an error wrapping
// overlay.ErrConflict, as Lookup reports it. p.allocMu is held.
func (p *Pool) cachedLocked(key overlay.AttachmentKey, blocks map[netip.Prefix]held) (overlay.Allocation, bool, error) {
	addr, ok := p.attach[key]
	if !ok {
		return overlay.Allocation{}, false, nil
	}
	if _, held := blocks[addr.Masked()]; !held {
		return overlay.Allocation{}, false, fmt.Errorf("allocate %s: its address %s is in a block %s no longer holds: %w", key, addr, p.host, overlay.ErrConflict)
	}
	return overlay.Allocation{Key: key, Addr: addr, Host: p.host}, true, nil
}

func (p *Pool) heldCopy() map[netip.Prefix]held {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[netip.Prefix]held, len(p.held))
	for b, h := range p.held {
		out[b] = h
	}
	return out
}

// stillHeld reports whether block b is still this host's, dropping it from
// the pool, and the allocation cache, when etcd shows it gone or
// re-claimed. A failed read proves nothing: the block is kept. p.allocMu
// is held.
func (p *Pool) stillHeld(ctx context.Context, b netip.Prefix, h held) bool {
	resp, err := p.s.cli.Get(ctx, p.s.blockKey(p.net.Name, b))
	if err != nil {
		return true
	}
	if len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != h.createRev {
		p.mu.Lock()
		delete(p.held, b)
		p.mu.Unlock()
		p.cached = false
		return false
	}
	return true
}

func (p *Pool) used(ctx context.Context, b netip.Prefix) (map[netip.Addr]bool, error) {
	prefix := p.s.addrsPrefix(p.net.Name, b)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", b, err)
	}
	used := make(map[netip.Addr]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if a, err := netip.ParseAddr(strings.TrimPrefix(string(kv.Key), prefix)); err == nil {
			used[a] = true
		}
	}
	return used, nil
}

// Lookup returns the allocation of key, or an error wrapping
// overlay.ErrNotFound.
func (p *Pool) Lookup(ctx context.Context, key overlay.AttachmentKey) (overlay.Allocation, error) {
	resp, err := p.s.cli.Get(ctx, p.s.attachKey(p.net.Name, p.host, key))
	if err != nil {
		return overlay.Allocation{}, fmt.Errorf("look up %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return overlay.Allocation{}, fmt.Errorf("look up %s on %s: %w", key, p.host, overlay.ErrNotFound)
	}
	addr, err := netip.ParsePrefix(string(resp.Kvs[0].Value))
	if err != nil {
		return overlay.Allocation{}, fmt.Errorf("look up %s: bad address %q: %w", key, resp.Kvs[0].Value, err)
	}
	p.mu.Lock()
	_, held := p.held[addr.Masked()]
	p.mu.Unlock()
	if !held {
		return overlay.Allocation{}, fmt.Errorf("look up %s: its address %s is in a block %s no longer holds: %w", key, addr, p.host, overlay.ErrConflict)
	}
	return overlay.Allocation{Key: key, Addr: addr, Host: p.host}, nil
}

// Release frees the address of key. A key without one is not an error.
func (p *Pool) Release(ctx context.Context, key overlay.AttachmentKey) error {
	p.allocMu.Lock()
	defer p.allocMu.Unlock()
	akey := p.s.attachKey(p.net.Name, p.host, key)
	for attempt := 0; attempt <= maxTxnRetries; attempt++ {
		resp, err := p.s.cli.Get(ctx, akey)
		if err != nil {
			return fmt.Errorf("release %s: %w", key, err)
		}
		if len(resp.Kvs) == 0 {
			if p.cached {
				delete(p.attach, key)
			}
			return nil
		}
		kv := resp.Kvs[0]
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(akey), "=", kv.ModRevision)}
		ops := []clientv3.Op{clientv3.OpDelete(akey)}
		// The address record goes too, but only if it names this
		// container interface: never free another holder's address.
		if addr, err := netip.ParsePrefix(string(kv.Value)); err == nil {
			b := netip.PrefixFrom(addr.Addr(), p.net.BlockBits).Masked()
			addrKey := p.s.addrsPrefix(p.net.Name, b) + addr.Addr().String()
			ar, err := p.s.cli.Get(ctx, addrKey)
			if err != nil {
				return fmt.Errorf("release %s: %w", key, err)
			}
			var rec AddrRecord
			if len(ar.Kvs) == 1 && json.Unmarshal(ar.Kvs[0].Value, &rec) == nil &&
				rec.Host == p.host && rec.ContainerID == key.ContainerID && rec.IfName == key.IfName {
				cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(addrKey), "=", ar.Kvs[0].ModRevision))
				ops = append(ops, clientv3.OpDelete(addrKey))
			}
		}
		tr, err := p.s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return fmt.Errorf("release %s: %w", key, err)
		}
		if tr.Succeeded {
			if p.cached {
				if addr, ok := p.attach[key]; ok {
					delete(p.usedAddr, addr.Addr())
				}
				delete(p.attach, key)
			}
			return nil
		}
	}
	return fmt.Errorf("release %s: attachment keeps changing: %w", key, overlay.ErrConflict)
}

// List returns every allocation of this host in the network.
func (p *Pool) List(ctx context.Context) ([]overlay.Allocation, error) {
	prefix := p.s.attachPrefix(p.net.Name, p.host)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list allocations of %s: %w", p.host, err)
	}
	var out []overlay.Allocation
	for _, kv := range resp.Kvs {
		cid, ifname, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), prefix), "/")
		addr, err := netip.ParsePrefix(string(kv.Value))
		if !ok || err != nil {
			continue
		}
		out = append(out, overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: cid, IfName: ifname}, Addr: addr, Host: p.host})
	}
	return out, nil
}

// Holder returns who holds address a of the network, or an error wrapping
// overlay.ErrNotFound when nobody does.
func (s *Store) Holder(ctx context.Context, n overlay.Network, a netip.Addr) (AddrRecord, error) {
	b := netip.PrefixFrom(a, n.BlockBits).Masked()
	resp, err := s.cli.Get(ctx, s.addrsPrefix(n.Name, b)+a.String())
	if err != nil {
		return AddrRecord{}, fmt.Errorf("look up holder of %s: %w", a, err)
	}
	if len(resp.Kvs) == 0 {
		return AddrRecord{}, fmt.Errorf("holder of %s: %w", a, overlay.ErrNotFound)
	}
	var rec AddrRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &rec); err != nil {
		return AddrRecord{}, fmt.Errorf("decode holder of %s: %w", a, err)
	}
	return rec, nil
}
