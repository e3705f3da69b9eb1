package overlaytest

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/overlaynet/overlay/overlay"
)

// Store is an in-memory block and address store for one network, shared
// by the Pools of several simulated hosts. It is safe for concurrent use.
type Store struct {
	// Network is the network whose blocks the store holds.
	Network overlay.Network

	mu     sync.Mutex // guards the fields below
	owners map[netip.Prefix]overlay.HostID
	hosts  map[overlay.HostID]overlay.HostInfo
	addrs  map[netip.Addr]overlay.Allocation
	// Err, when set, makes every call fail, as an etcd outage would.
	err error
	// flushErr, when set, makes Flush fail, as a failing disk would.
	flushErr error
}

var (
	_ overlay.BlockOwners   = (*Store)(nil)
	_ overlay.HostDirectory = (*Store)(nil)
)

// NewStore returns an empty store for network n.
func NewStore(n overlay.Network) *Store {
	return &Store{
		Network: n,
		owners:  make(map[netip.Prefix]overlay.HostID),
		addrs:   make(map[netip.Addr]overlay.Allocation),
	}
}

// SetErr makes every later call fail with err (nil to recover).
func (s *Store) SetErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// SetFlushErr makes every later Flush fail with err (nil to recover).
// Decisions are kept, as a real allocator keeps them for the next Flush.
func (s *Store) SetFlushErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushErr = err
}

// SetOwner records h as the owner of block b, or frees b when h is "".
func (s *Store) SetOwner(b netip.Prefix, h overlay.HostID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h == "" {
		delete(s.owners, b)
		return
	}
	s.owners[b] = h
}

// Owners returns a copy of the block owners.
func (s *Store) Owners(context.Context) (map[netip.Prefix]overlay.HostID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	out := make(map[netip.Prefix]overlay.HostID, len(s.owners))
	for b, h := range s.owners {
		out[b] = h
	}
	return out, nil
}

// Pool returns host's view of the store: its block leaser and allocator.
func (s *Store) Pool(host overlay.HostID) *Pool { return &Pool{s: s, host: host} }

// Pool is one host's block leaser and address allocator over a Store.
type Pool struct {
	s    *Store
	host overlay.HostID
}

var (
	_ overlay.BlockOwners = (*Pool)(nil)
	_ overlay.Allocator   = (*Pool)(nil)
)

// Owners returns the store's block owners.
func (p *Pool) Owners(ctx context.Context) (map[netip.Prefix]overlay.HostID, error) {
	return p.s.Owners(ctx)
}

// Lease returns the host's blocks, claiming the first free one if none.
func (p *Pool) Lease(context.Context) ([]netip.Prefix, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return nil, p.s.err
	}
	n := p.s.Network
	if held := p.heldLocked(); len(held) > 0 {
		return held, nil
	}
	for i := range n.NumBlocks() {
		b := n.Block(i)
		if _, taken := p.s.owners[b]; !taken {
			p.s.owners[b] = p.host
			return []netip.Prefix{b}, nil
		}
	}
	return nil, fmt.Errorf("lease block for %s: %w", p.host, overlay.ErrPoolExhausted)
}

// Held returns the host's blocks, sorted.
func (p *Pool) Held() []netip.Prefix {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	return p.heldLocked()
}

func (p *Pool) heldLocked() []netip.Prefix {
	var held []netip.Prefix
	for i := range p.s.Network.NumBlocks() {
		b := p.s.Network.Block(i)
		if p.s.owners[b] == p.host {
			held = append(held, b)
		}
	}
	return held
}

// ReleaseBlocks frees the host's blocks and their addresses.
func (p *Pool) ReleaseBlocks(context.Context) error {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return p.s.err
	}
	for b, h := range p.s.owners {
		if h == p.host {
			delete(p.s.owners, b)
		}
	}
	for a, al := range p.s.addrs {
		if al.Host == p.host {
			delete(p.s.addrs, a)
		}
	}
	return nil
}

// Allocate returns key's address, allocating the lowest free one with
// endpoint ep.
func (p *Pool) Allocate(_ context.Context, key overlay.AttachmentKey, ep overlay.Endpoint) (overlay.Allocation, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return overlay.Allocation{}, p.s.err
	}
	if al, ok := p.lookupLocked(key); ok {
		return al, nil
	}
	for _, b := range p.heldLocked() {
		for a := overlay.Gateway(b).Next(); a != overlay.Broadcast(b); a = a.Next() {
			if _, used := p.s.addrs[a]; !used {
				al := overlay.Allocation{Key: key, Addr: netip.PrefixFrom(a, b.Bits()), Host: p.host, Endpoint: ep.Clone()}
				p.s.addrs[a] = al
				al.New = true
				return al, nil
			}
		}
	}
	return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, overlay.ErrPoolExhausted)
}

// Flush fails as SetErr or SetFlushErr say; the store has nothing else
// to make durable.
func (p *Pool) Flush(context.Context) error {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return p.s.err
	}
	return p.s.flushErr
}

// AllocateAddr gives key the address a if it is a free container address
// of the host's blocks, with endpoint ep.
func (p *Pool) AllocateAddr(_ context.Context, key overlay.AttachmentKey, a netip.Addr, ep overlay.Endpoint) (overlay.Allocation, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return overlay.Allocation{}, p.s.err
	}
	if al, ok := p.lookupLocked(key); ok {
		if al.Addr.Addr() == a {
			return al, nil
		}
		return overlay.Allocation{}, fmt.Errorf("allocate %s: %s holds %s: %w", a, key, al.Addr, overlay.ErrConflict)
	}
	for _, b := range p.heldLocked() {
		if !b.Contains(a) || a == b.Addr() || a == overlay.Gateway(b) || a == overlay.Broadcast(b) {
			continue
		}
		if _, used := p.s.addrs[a]; used {
			break
		}
		al := overlay.Allocation{Key: key, Addr: netip.PrefixFrom(a, b.Bits()), Host: p.host, Endpoint: ep.Clone()}
		p.s.addrs[a] = al
		al.New = true
		return al, nil
	}
	return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: %w", a, key, overlay.ErrConflict)
}

func (p *Pool) lookupLocked(key overlay.AttachmentKey) (overlay.Allocation, bool) {
	for _, al := range p.s.addrs {
		if al.Host == p.host && al.Key == key {
			return al, true
		}
	}
	return overlay.Allocation{}, false
}

// Release frees key's address; a key with none is not an error.
func (p *Pool) Release(_ context.Context, key overlay.AttachmentKey) error {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return p.s.err
	}
	if al, ok := p.lookupLocked(key); ok {
		delete(p.s.addrs, al.Addr.Addr())
	}
	return nil
}

// Lookup returns key's allocation or overlay.ErrNotFound.
func (p *Pool) Lookup(_ context.Context, key overlay.AttachmentKey) (overlay.Allocation, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return overlay.Allocation{}, p.s.err
	}
	if al, ok := p.lookupLocked(key); ok {
		return al, nil
	}
	return overlay.Allocation{}, fmt.Errorf("lookup %s: %w", key, overlay.ErrNotFound)
}

// List returns the host's allocations.
func (p *Pool) List(context.Context) ([]overlay.Allocation, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.err != nil {
		return nil, p.s.err
	}
	var out []overlay.Allocation
	for _, al := range p.s.addrs {
		if al.Host == p.host {
			out = append(out, al)
		}
	}
	return out, nil
}

// SetHost records h as a registered host, replacing its earlier record.
func (s *Store) SetHost(h overlay.HostInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hosts == nil {
		s.hosts = make(map[overlay.HostID]overlay.HostInfo)
	}
	s.hosts[h.Host] = h
}

// DeleteHost removes the record of h.
func (s *Store) DeleteHost(h overlay.HostID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.hosts, h)
}

// Hosts returns the registered hosts, sorted by host ID: the store's
// overlay.HostDirectory.
func (s *Store) Hosts(context.Context) ([]overlay.HostInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	out := make([]overlay.HostInfo, 0, len(s.hosts))
	for _, h := range s.hosts {
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b overlay.HostInfo) int { return strings.Compare(string(a.Host), string(b.Host)) })
	return out, nil
}

// Headroom returns the free addresses of the host's blocks, and an error
// wrapping overlay.ErrPoolExhausted when there are none: the fake claims
// no block on demand.
func (p *Pool) Headroom() (int, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	free := len(p.heldLocked()) * p.s.Network.BlockCapacity()
	for _, al := range p.s.addrs {
		if al.Host == p.host {
			free--
		}
	}
	if free <= 0 {
		return 0, fmt.Errorf("host %s: every address of its blocks is in use: %w", p.host, overlay.ErrPoolExhausted)
	}
	return free, nil
}
