package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// ErrBlockLost is wrapped by the errors of Verify, Give and Mirror when a
// block this host held is now owned by another host or was deleted.
var ErrBlockLost = overlay.ErrBlockLost

// maxTxnRetries bounds how often one operation retries a transaction that
// lost a race before giving up.
const maxTxnRetries = 5

// BlockRecord is the value of a block's key: who owns it and since when.
// A block has no etcd lease and needs no renewal: it stays with its owner
// through etcd outages and overlayd restarts, and changes hands only when
// the owner gives it back, an operator removes the owner, or the owner's
// liveness key has been gone for the reclaim period.
type BlockRecord struct {
	// Host owns the block.
	Host overlay.HostID `json:"host"`
	// Claimed is when the host claimed the block.
	Claimed time.Time `json:"claimed"`
}

// AddrRecord is the value of an address's key: who holds it, the
// endpoint (CNM's term) of the address.
type AddrRecord struct {
	// Host is the host whose block the address belongs to.
	Host overlay.HostID `json:"host"`
	// ContainerID is the runtime's ID of the container.
	ContainerID string `json:"containerID"`
	// IfName is the interface name inside the container.
	IfName string `json:"ifName"`
	// MAC is the container interface's MAC address; records of older
	// hosts have none.
	MAC string `json:"mac,omitempty"`
	// Labels are the endpoint's labels.
	Labels map[string]string `json:"labels,omitempty"`
}

// addrRecord returns the record of al, made by host.
func addrRecord(host overlay.HostID, al overlay.Allocation) AddrRecord {
	rec := AddrRecord{Host: host, ContainerID: al.Key.ContainerID, IfName: al.Key.IfName, Labels: al.Endpoint.Labels}
	if al.Endpoint.MAC != nil {
		rec.MAC = al.Endpoint.MAC.String()
	}
	return rec
}

// Endpoint returns the MAC address and labels of the record. A MAC
// address that is not a unicast Ethernet address, or labels that
// overlay.Endpoint.Validate refuses, are left out.
func (r AddrRecord) Endpoint() overlay.Endpoint {
	var ep overlay.Endpoint
	if mac, err := net.ParseMAC(r.MAC); err == nil && overlay.ValidateMAC(mac) == nil {
		ep.MAC = mac
	}
	if (overlay.Endpoint{Labels: r.Labels}).Validate() == nil {
		ep.Labels = r.Labels
	}
	return ep
}

// held is a block this host owns, with the revisions that prove it.
type held struct {
	createRev int64 // create revision of the block key: changes only if it is re-claimed
	modRev    int64 // last modification revision seen: the compare of a renewal
}

// Pool is one host's view of one network in etcd: it claims, checks and
// gives back the host's blocks, and mirrors the allocations the host makes from them (which the
// host keeps itself, see package ipam/local). It implements ipam.Leaser
// and overlay.BlockOwners and is safe for concurrent use. Its methods block
// on etcd like Store's, bounded the same way.
type Pool struct {
	s    *Store
	net  overlay.Network
	host overlay.HostID

	mirrorMu sync.Mutex // one mirror pass at a time

	// dense is set when the last listing of the network's blocks found
	// more than three quarters of them taken: a claim then lists at once
	// rather than try blindly.
	dense atomic.Bool

	mu   sync.Mutex // guards held
	held map[netip.Prefix]held
}

var _ overlay.BlockOwners = (*Pool)(nil)

// Pool returns host's pool of network n.
func (s *Store) Pool(n overlay.Network, host overlay.HostID) *Pool {
	return &Pool{s: s, net: n, host: host, held: make(map[netip.Prefix]held)}
}

// Owners returns the owner of every claimed block of the network.
func (p *Pool) Owners(ctx context.Context) (map[netip.Prefix]overlay.HostID, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
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
	block     netip.Prefix
}

func (p *Pool) blocks(ctx context.Context) (map[netip.Prefix]blockKV, error) {
	prefix := p.s.blocksPrefix(p.net.Name)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list blocks of %s: %w", p.net.Name, err)
	}
	return decodeBlocks(prefix, resp.Kvs, func(b netip.Prefix) bool { return p.net.BlockIndex(b) >= 0 }), nil
}

// maxTxnOps is how many operations one transaction holds at most: etcd's
// default limit (--max-txn-ops).
const maxTxnOps = 128

// heldRecords reads the records of blocks bs, and only those, in
// transactions of at most maxTxnOps reads: what the host checks
// periodically costs what it holds, not what the cluster holds. A block
// with no key is missing from the result.
func (p *Pool) heldRecords(ctx context.Context, bs []netip.Prefix) (map[netip.Prefix]blockKV, error) {
	out := make(map[netip.Prefix]blockKV, len(bs))
	prefix := p.s.blocksPrefix(p.net.Name)
	for chunk := range slices.Chunk(bs, maxTxnOps) {
		ops := make([]clientv3.Op, len(chunk))
		for i, b := range chunk {
			ops[i] = clientv3.OpGet(p.s.blockKey(p.net.Name, b))
		}
		resp, err := p.s.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, fmt.Errorf("read blocks of %s: %w", p.net.Name, err)
		}
		for _, r := range resp.Responses {
			maps.Copy(out, decodeBlocks(prefix, r.GetResponseRange().Kvs, nil))
		}
	}
	return out, nil
}

// unknownOwner owns, as far as this package is concerned, a block whose
// record cannot be decoded: nobody claims, reclaims or removes it over a
// record it cannot read.
const unknownOwner overlay.HostID = "?"

// decodeBlocks decodes the block keys below prefix for which valid (nil:
// any) is true; a key that names no block is skipped, never treated as
// free.
func decodeBlocks(prefix string, kvs []*mvccpb.KeyValue, valid func(netip.Prefix) bool) map[netip.Prefix]blockKV {
	out := make(map[netip.Prefix]blockKV, len(kvs))
	for _, kv := range kvs {
		b, err := parseBlockName(strings.TrimPrefix(string(kv.Key), prefix))
		if err != nil || valid != nil && !valid(b) {
			continue
		}
		var rec BlockRecord
		if json.Unmarshal(kv.Value, &rec) != nil || rec.Host == "" {
			rec.Host = unknownOwner
		}
		out[b] = blockKV{rec: rec, createRev: kv.CreateRevision, modRev: kv.ModRevision, block: b}
	}
	return out
}

// Held returns the blocks this pool knows it holds, sorted.
func (p *Pool) Held() []netip.Prefix { return sortedBlocks(p.heldCopy()) }

func sortedBlocks(m map[netip.Prefix]held) []netip.Prefix {
	return slices.SortedFunc(maps.Keys(m), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
}

// Load reads the blocks the host holds from etcd, so that a restarted
// host gets its blocks back, and returns them sorted.
func (p *Pool) Load(ctx context.Context) ([]netip.Prefix, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	recs, err := p.blocks(ctx)
	if err != nil {
		return nil, fmt.Errorf("load blocks of %s: %w", p.host, err)
	}
	p.mu.Lock()
	clear(p.held)
	for b, r := range recs {
		if r.rec.Host == p.host {
			p.held[b] = held{createRev: r.createRev, modRev: r.modRev}
		}
	}
	p.mu.Unlock()
	return p.Held(), nil
}

// Lease returns the blocks the host holds, claiming a free one when it
// holds none.
func (p *Pool) Lease(ctx context.Context) ([]netip.Prefix, error) {
	blocks, err := p.Load(ctx)
	if err != nil || len(blocks) > 0 {
		return blocks, err
	}
	if _, err := p.Claim(ctx, netip.Prefix{}, nil); err != nil {
		return nil, err
	}
	return p.Held(), nil
}

// randomPicks is how many random blocks a claim tries before it lists
// the network's blocks to pick among the free ones: in a network a
// quarter free, 8 tries find a free block 9 times out of 10. In a denser
// one a claim lists at once.
const randomPicks = 8

// ErrBlockTaken is wrapped by the error of a Claim whose wanted block
// another host holds.
var ErrBlockTaken = errors.New("etcd: block held by another host")

// Claim claims one more block for the host and returns it. With want
// valid it claims that block, failing with an error wrapping
// ErrBlockTaken, and naming the owner, when another host holds it;
// otherwise it claims a random free block of the network for which avoid
// (nil: none) is false: a few random blocks, then a random one of the
// free blocks listed. Hosts racing for blocks each try random ones; a
// claim is a transaction that succeeds only when the block's key
// does not exist, so no block ever has two owners. A network with no free
// block is an error wrapping overlay.ErrPoolExhausted that names its size.
func (p *Pool) Claim(ctx context.Context, want netip.Prefix, avoid func(netip.Prefix) bool) (netip.Prefix, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	if want.IsValid() && p.net.BlockIndex(want) < 0 {
		return netip.Prefix{}, fmt.Errorf("claim %s: not a block of network %s (%s, blocks of /%d): %w", want, p.net.Name, p.net.CIDR, p.net.BlockBits, overlay.ErrConflict)
	}
	now := time.Now().UTC()
	val, err := json.Marshal(BlockRecord{Host: p.host, Claimed: now})
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("encode block record: %w", err)
	}
	try := func(b netip.Prefix) (bool, error) {
		key := p.s.blockKey(p.net.Name, b)
		// Fenced on the network: a claim racing with its deletion must
		// not leave a block behind. The Else branch reads the block, so
		// that a claim sent again finds its own first attempt.
		txn := func(ctx context.Context) (*clientv3.TxnResponse, error) {
			return p.s.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
					clientv3.Compare(clientv3.CreateRevision(p.s.networkKey(p.net.Name)), ">", 0)).
				Then(clientv3.OpPut(key, string(val))).
				Else(clientv3.OpGet(p.s.networkKey(p.net.Name), clientv3.WithCountOnly()), clientv3.OpGet(key)).
				Commit()
		}
		resp, err := txn(ctx)
		if err != nil {
			// The claim may be committed, or still waiting in etcd's
			// log, while its answer is lost (a timeout under load): a
			// block this host owns in etcd but does not know it holds
			// would be lost to the network until the host restarts.
			// The same claim sent again has a definite answer: it
			// commits if the first never will, or fails its compare
			// and reads the first's record.
			if resp, err = p.resend(ctx, txn); err != nil {
				return false, fmt.Errorf("claim block %s for %s: %w", b, p.host, err)
			}
		}
		if !resp.Succeeded && resp.Responses[0].GetResponseRange().Count == 0 {
			return false, fmt.Errorf("claim block %s for %s: network %q was deleted: %w", b, p.host, p.net.Name, overlay.ErrNotFound)
		}
		if !resp.Succeeded {
			if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 && ownClaim(kvs[0].Value, p.host, now) {
				p.mu.Lock()
				p.held[b] = held{createRev: kvs[0].CreateRevision, modRev: kvs[0].ModRevision}
				p.mu.Unlock()
				return true, nil
			}
			return false, nil
		}
		rev := resp.Header.Revision
		p.mu.Lock()
		p.held[b] = held{createRev: rev, modRev: rev}
		p.mu.Unlock()
		return true, nil
	}
	if want.IsValid() {
		if ok, err := try(want); ok || err != nil {
			return want, err
		}
		resp, err := p.s.cli.Get(ctx, p.s.blockKey(p.net.Name, want))
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("claim block %s for %s: %w", want, p.host, err)
		}
		rec, ok := decodeBlocks(p.s.blocksPrefix(p.net.Name), resp.Kvs, nil)[want]
		if !ok {
			// Given back between the two requests: take it now.
			return p.Claim(ctx, want, avoid)
		}
		if rec.rec.Host == p.host {
			p.mu.Lock()
			p.held[want] = held{createRev: rec.createRev, modRev: rec.modRev}
			p.mu.Unlock()
			return want, nil
		}
		return netip.Prefix{}, fmt.Errorf("block %s of network %s is held by host %s: %w", want, p.net.Name, rec.rec.Host, ErrBlockTaken)
	}

	// A few blind tries at random blocks first: each is one transaction,
	// where reading the network's blocks to pick a free one costs a
	// request whose size grows with the cluster.
	tried := make(map[netip.Prefix]bool, randomPicks)
	for range randomPicks {
		if p.dense.Load() {
			break
		}
		b := p.net.Block(rand.IntN(p.net.NumBlocks()))
		if tried[b] || (avoid != nil && avoid(b)) {
			continue
		}
		tried[b] = true
		ok, err := try(b)
		if err != nil {
			return netip.Prefix{}, err
		}
		if ok {
			return b, nil
		}
	}
	taken, err := p.taken(ctx)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("claim a block for %s: %w", p.host, err)
	}
	p.dense.Store(len(taken) > p.net.NumBlocks()/4*3)
	usable := func(b netip.Prefix) bool { return !taken[b] && (avoid == nil || !avoid(b)) }
	// A dense network: pick among the free blocks.
	var free []netip.Prefix
	for i := range p.net.NumBlocks() {
		if b := p.net.Block(i); usable(b) {
			free = append(free, b)
		}
	}
	for len(free) > 0 {
		i := rand.IntN(len(free))
		b := free[i]
		ok, err := try(b)
		if err != nil {
			return netip.Prefix{}, err
		}
		if ok {
			return b, nil
		}
		// Another host won this one: try another.
		free[i] = free[len(free)-1]
		free = free[:len(free)-1]
	}
	return netip.Prefix{}, fmt.Errorf("claim a block for %s: network %s (%s) has no free block of its %d blocks of /%d: %w",
		p.host, p.net.Name, p.net.CIDR, p.net.NumBlocks(), p.net.BlockBits, overlay.ErrPoolExhausted)
}

// resendTimeout bounds the claims sent again to learn what became of
// one whose answer was lost, all together.
const resendTimeout = 5 * time.Second

// resend sends a claim whose answer was lost again, until one attempt
// gets an answer or resendTimeout has passed. It uses a bound of its own:
// the claim's context may be what ran out.
func (p *Pool) resend(ctx context.Context, txn func(context.Context) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), resendTimeout)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, resendTimeout/5)
		resp, err := txn(actx)
		acancel()
		if err == nil || ctx.Err() != nil {
			return resp, err
		}
		select { // an etcd that refuses at once is not asked in a loop
		case <-ctx.Done():
			return nil, err
		case <-time.After(resendTimeout / 50):
		}
	}
}

// ownClaim reports whether a block record is host's claim made at
// claimedAt.
func ownClaim(val []byte, host overlay.HostID, claimedAt time.Time) bool {
	var rec BlockRecord
	return json.Unmarshal(val, &rec) == nil && rec.Host == host && rec.Claimed.Equal(claimedAt)
}

// taken returns the network's claimed blocks, reading keys only: what a
// claim needs to pick a free one.
func (p *Pool) taken(ctx context.Context) (map[netip.Prefix]bool, error) {
	prefix := p.s.blocksPrefix(p.net.Name)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list blocks of %s: %w", p.net.Name, err)
	}
	out := make(map[netip.Prefix]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if b, err := parseBlockName(strings.TrimPrefix(string(kv.Key), prefix)); err == nil {
			out[b] = true
		}
	}
	return out, nil
}

// Give gives back block b, which the host holds and has no address
// allocated from, with etcd's copy of its addresses, in one transaction
// that checks the block is still the host's. A block the host does not
// hold is not an error.
func (p *Pool) Give(ctx context.Context, b netip.Prefix) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	// No mirror pass runs meanwhile: it would find the block gone.
	p.mirrorMu.Lock()
	defer p.mirrorMu.Unlock()
	p.mu.Lock()
	h, ok := p.held[b]
	p.mu.Unlock()
	if !ok {
		return nil
	}
	key := p.s.blockKey(p.net.Name, b)
	resp, err := p.s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", h.createRev)).
		Then(clientv3.OpDelete(p.s.addrsPrefix(p.net.Name, b), clientv3.WithPrefix()), clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("give back block %s of %s: %w", b, p.host, err)
	}
	p.mu.Lock()
	delete(p.held, b)
	p.mu.Unlock()
	if !resp.Succeeded {
		return fmt.Errorf("give back block %s of %s: %w", b, p.host, ErrBlockLost)
	}
	return nil
}

// Verify reads the host's blocks in etcd and reports those it held that
// are now another host's or gone (reclaimed after the host was away, or
// removed by an operator): they are dropped from the pool, and the error
// wraps ErrBlockLost. It only reads: the host's ownership needs no
// renewal, since a block has no lease.
func (p *Pool) Verify(ctx context.Context) ([]netip.Prefix, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	recs, err := p.heldRecords(ctx, p.Held())
	if err != nil {
		return nil, fmt.Errorf("verify blocks of %s: %w", p.host, err)
	}
	var lost []netip.Prefix
	p.mu.Lock()
	for b, h := range p.held {
		r, ok := recs[b]
		if !ok || r.createRev != h.createRev || r.rec.Host != p.host {
			delete(p.held, b)
			lost = append(lost, b)
			continue
		}
		p.held[b] = held{createRev: h.createRev, modRev: r.modRev}
	}
	p.mu.Unlock()
	if len(lost) == 0 {
		return nil, nil
	}
	slices.SortFunc(lost, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return lost, fmt.Errorf("blocks %v of %s in network %s: %w", lost, p.host, p.net.Name, ErrBlockLost)
}

// ReleaseBlocks gives back every block the host owns, with every address
// allocated from them and the host's attachment index, in one
// transaction: it happens whole or not at all.
func (p *Pool) ReleaseBlocks(ctx context.Context) error {
	ctx, cancel := bound(ctx)
	defer cancel()
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
			return nil
		}
	}
	return fmt.Errorf("release blocks of %s: blocks keep changing: %w", p.host, overlay.ErrConflict)
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

// mirrorTxnOps bounds the operations of one mirror transaction, under
// etcd's default limit of 128.
const mirrorTxnOps = 100

// Mirror makes etcd's records of this host's allocations equal want: the
// attachment index (List) and the address records of the blocks it holds
// (Holder). want is the host's own, authoritative record; an entry in a
// block the host no longer holds is not copied. Records in held blocks
// that want lacks are deleted. Every transaction checks that the blocks
// are still this host's, so a lost block is never written to: that fails
// with an error wrapping ErrBlockLost. It returns how many keys it
// changed.
func (p *Pool) Mirror(ctx context.Context, want []overlay.Allocation) (int, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	p.mirrorMu.Lock()
	defer p.mirrorMu.Unlock()
	blocks := p.heldCopy()
	wantAttach := make(map[string]string)
	wantAddr := make(map[string]string)
	for _, al := range want {
		if _, ok := blocks[netip.PrefixFrom(al.Addr.Addr(), p.net.BlockBits).Masked()]; !ok {
			continue
		}
		rec, err := json.Marshal(addrRecord(p.host, al))
		if err != nil {
			return 0, fmt.Errorf("mirror allocations: encode: %w", err)
		}
		wantAttach[p.s.attachKey(p.net.Name, p.host, al.Key)] = al.Addr.String()
		wantAddr[p.s.addrsPrefix(p.net.Name, al.Addr.Masked())+al.Addr.Addr().String()] = string(rec)
	}

	// What etcd has: the host's attachment index and its blocks' addresses.
	have := make(map[string]string)
	prefixes := []string{p.s.attachPrefix(p.net.Name, p.host)}
	var cmps []clientv3.Cmp
	for _, b := range sortedBlocks(blocks) {
		prefixes = append(prefixes, p.s.addrsPrefix(p.net.Name, b))
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(p.s.blockKey(p.net.Name, b)), "=", blocks[b].createRev))
	}
	for _, prefix := range prefixes {
		resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
		if err != nil {
			return 0, fmt.Errorf("mirror allocations of %s: %w", p.host, err)
		}
		for _, kv := range resp.Kvs {
			have[string(kv.Key)] = string(kv.Value)
		}
	}
	var ops []clientv3.Op
	for _, w := range []map[string]string{wantAttach, wantAddr} {
		for k, v := range w {
			if got, ok := have[k]; !ok || got != v {
				ops = append(ops, clientv3.OpPut(k, v))
			}
		}
	}
	for k := range have {
		if _, ok := wantAttach[k]; !ok {
			if _, ok := wantAddr[k]; !ok {
				ops = append(ops, clientv3.OpDelete(k))
			}
		}
	}
	for done := 0; done < len(ops); done += mirrorTxnOps {
		chunk := ops[done:min(done+mirrorTxnOps, len(ops))]
		resp, err := p.s.cli.Txn(ctx).If(cmps...).Then(chunk...).Commit()
		if err != nil {
			return done, fmt.Errorf("mirror allocations of %s: %w", p.host, err)
		}
		if !resp.Succeeded {
			return done, fmt.Errorf("mirror allocations of %s: a block was re-claimed or deleted: %w", p.host, ErrBlockLost)
		}
	}
	return len(ops), nil
}

// List returns this host's allocations in the network as etcd has them:
// what the mirror last copied, each with its endpoint (MAC address and
// labels) from its address's record.
func (p *Pool) List(ctx context.Context) ([]overlay.Allocation, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	prefix := p.s.attachPrefix(p.net.Name, p.host)
	resp, err := p.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list allocations of %s: %w", p.host, err)
	}
	var out []overlay.Allocation
	blocks := make(map[netip.Prefix]bool)
	for _, kv := range resp.Kvs {
		cid, ifname, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), prefix), "/")
		addr, err := netip.ParsePrefix(string(kv.Value))
		if !ok || err != nil {
			continue
		}
		out = append(out, overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: cid, IfName: ifname}, Addr: addr, Host: p.host})
		blocks[addr.Masked()] = true
	}
	if len(out) == 0 {
		return out, nil
	}
	// A record that cannot be decoded only loses its endpoint.
	eps, err := p.s.endpoints(ctx, p.net.Name, slices.Collect(maps.Keys(blocks)))
	if err != nil && !errors.Is(err, ErrBadRecord) {
		return nil, fmt.Errorf("list allocations of %s: %w", p.host, err)
	}
	byAddr := make(map[netip.Addr]EndpointRecord, len(eps))
	for _, ep := range eps {
		byAddr[ep.Addr.Addr()] = ep
	}
	for i, al := range out {
		if ep, ok := byAddr[al.Addr.Addr()]; ok && ep.Host == p.host && ep.ContainerID == al.Key.ContainerID && ep.IfName == al.Key.IfName {
			out[i].Endpoint = ep.Endpoint()
		}
	}
	return out, nil
}

// Holder returns who holds address a of the network, or an error wrapping
// overlay.ErrNotFound when nobody does.
func (s *Store) Holder(ctx context.Context, n overlay.Network, a netip.Addr) (AddrRecord, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
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
