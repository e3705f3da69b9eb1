// Package local keeps a host's address allocations on its own disk, so
// that handing out an address never waits on etcd.
//
// A host allocates only from blocks it holds, and no other host allocates
// from those, so the host's own record is enough to keep every address
// unique. The record is a bbolt file in overlayd's data directory.
// Allocations and releases are decided in memory at once, in order, and
// Flush commits every decision made so far in one transaction synced to
// disk: a caller answers nobody before Flush returns, so what it answered
// survives kill -9 and a reboot, and concurrent callers share a disk sync.
// etcd gets a copy afterwards, so that any host can answer who holds an
// address: Changed tells the mirror when to copy (see etcd.Pool.Mirror).
//
// Each network has two buckets: "network/<name>", an allocation's
// address by "containerID/ifName", and "endpoint/<name>", the same
// allocation's MAC address and labels as JSON (endpointRecord), when it
// has either. The endpoints are apart so that an older overlayd, which
// knows only the first bucket, still reads the file.
package local

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/overlaynet/overlay/overlay"
)

// openTimeout bounds the wait for the file lock: another process holding
// it is another overlayd on the same data directory.
const openTimeout = time.Second

var (
	metaBucket = []byte("meta")
	hostKey    = []byte("host")
)

// DB is a host's allocation file, holding one bucket per network.
type DB struct {
	db   *bolt.DB
	path string
}

// Open opens or creates the allocation file at path for host. A file
// written for another host ID is refused: its allocations would be from
// blocks this host does not hold.
func Open(path string, host overlay.HostID) (*DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: openTimeout})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("open allocations %s: locked by another process: is another overlayd using this data directory?", path)
	}
	if err != nil {
		return nil, fmt.Errorf("open allocations %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		switch got := b.Get(hostKey); {
		case got == nil:
			return b.Put(hostKey, []byte(host))
		case string(got) != string(host):
			return fmt.Errorf("the file belongs to host %s, not %s", got, host)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open allocations %s: %w", path, err)
	}
	return &DB{db: db, path: path}, nil
}

// Close closes the file.
func (d *DB) Close() error { return d.db.Close() }

// Drop deletes every allocation of network: what teardown does once its
// blocks are given back.
func (d *DB) Drop(network string) error {
	err := d.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(metaBucket).Delete(idKey(network)); err != nil {
			return err
		}
		for _, name := range [][]byte{bucketName(network), endpointBucketName(network)} {
			if err := tx.DeleteBucket(name); err != nil && !errors.Is(err, bolterrors.ErrBucketNotFound) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("drop allocations of %s: %w", network, err)
	}
	return nil
}

func bucketName(network string) []byte { return []byte("network/" + network) }

func endpointBucketName(network string) []byte { return []byte("endpoint/" + network) }

// idKey is the key, in the meta bucket, of the ID of the network whose
// allocations the network's bucket holds.
func idKey(network string) []byte { return []byte("id/" + network) }

// NetworkID returns the ID of the network the file holds allocations of
// under name: "" when it holds none, or they were recorded before IDs
// were. A network deleted and created again under its name while
// overlayd was down has another ID.
func (d *DB) NetworkID(network string) (string, error) {
	var id string
	err := d.db.View(func(tx *bolt.Tx) error {
		id = string(tx.Bucket(metaBucket).Get(idKey(network)))
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("read the network ID of %s in %s: %w", network, d.path, err)
	}
	return id, nil
}

// Networks returns the networks the file holds allocations of, sorted.
func (d *DB) Networks() ([]string, error) {
	var out []string
	err := d.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
			if n, ok := strings.CutPrefix(string(name), "network/"); ok {
				out = append(out, n)
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list networks in %s: %w", d.path, err)
	}
	return out, nil
}

// Allocator hands out addresses of one network from the blocks this host
// holds. It implements overlay.Allocator and is safe for concurrent use.
type Allocator struct {
	db      *DB
	net     overlay.Network
	host    overlay.HostID
	held    func() []netip.Prefix
	changed chan struct{}

	commit chan struct{} // a token: one commit at a time

	mu      sync.Mutex // guards the maps and the queue
	attach  map[overlay.AttachmentKey]entry
	used    map[netip.Addr]overlay.AttachmentKey
	inBlock map[netip.Prefix]int // addresses used, by block
	pending []change             // decided, not yet on disk, in order
	decided uint64               // changes decided so far
	flushed uint64               // changes on disk
}

// entry is what an attachment holds: an address and its endpoint.
type entry struct {
	addr netip.Prefix
	ep   overlay.Endpoint
}

// change is one decision waiting to be committed: key's address and
// endpoint, or its release.
type change struct {
	key     overlay.AttachmentKey
	entry   entry
	release bool
}

var _ overlay.Allocator = (*Allocator)(nil)

// Allocator returns the allocator of network n, which allocates from the
// blocks held returns (ipam.Pool's Held). Fresh is true when the
// file had no record of the network yet: a host that ran an older
// overlayd imports its allocations from etcd then. The network's ID, when
// it has one, is recorded with them (NetworkID).
func (d *DB) Allocator(n overlay.Network, host overlay.HostID, held func() []netip.Prefix) (a *Allocator, fresh bool, err error) {
	a = &Allocator{db: d, net: n, host: host, held: held, changed: make(chan struct{}, 1), commit: make(chan struct{}, 1),
		attach: make(map[overlay.AttachmentKey]entry), used: make(map[netip.Addr]overlay.AttachmentKey),
		inBlock: make(map[netip.Prefix]int)}
	err = d.db.Update(func(tx *bolt.Tx) error {
		if n.ID != "" {
			if err := tx.Bucket(metaBucket).Put(idKey(n.Name), []byte(n.ID)); err != nil {
				return err
			}
		}
		eb, err := tx.CreateBucketIfNotExists(endpointBucketName(n.Name))
		if err != nil {
			return err
		}
		b := tx.Bucket(bucketName(n.Name))
		if b == nil {
			fresh = true
			_, err := tx.CreateBucket(bucketName(n.Name))
			return err
		}
		err = b.ForEach(func(k, v []byte) error {
			key, addr, err := decode(k, v)
			if err != nil {
				return err
			}
			a.attach[key] = entry{addr: addr}
			a.used[addr.Addr()] = key
			a.inBlock[addr.Masked()]++
			return nil
		})
		if err != nil {
			return err
		}
		return loadEndpoints(eb, a.attach)
	})
	if err != nil {
		return nil, false, fmt.Errorf("load allocations of %s from %s: %w", n.Name, d.path, err)
	}
	return a, fresh, nil
}

// encode and decode map an allocation to its bbolt key and value:
// "containerID/ifName" (an interface name has no slash) and the address
// with its block's prefix length.
func encode(key overlay.AttachmentKey, addr netip.Prefix) (k, v []byte) {
	return []byte(key.ContainerID + "/" + key.IfName), []byte(addr.String())
}

func decode(k, v []byte) (overlay.AttachmentKey, netip.Prefix, error) {
	key, kerr := decodeKey(k)
	addr, err := netip.ParsePrefix(string(v))
	if kerr != nil || err != nil {
		return overlay.AttachmentKey{}, netip.Prefix{}, fmt.Errorf("corrupt allocation %q = %q", k, v)
	}
	return key, addr, nil
}

func decodeKey(k []byte) (overlay.AttachmentKey, error) {
	i := strings.LastIndexByte(string(k), '/')
	if i < 0 {
		return overlay.AttachmentKey{}, fmt.Errorf("corrupt allocation key %q", k)
	}
	return overlay.AttachmentKey{ContainerID: string(k[:i]), IfName: string(k[i+1:])}, nil
}

// endpointRecord is the value of an endpoint bucket's key.
type endpointRecord struct {
	MAC    string            `json:"mac,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

func encodeEndpoint(ep overlay.Endpoint) ([]byte, error) {
	rec := endpointRecord{Labels: ep.Labels}
	if ep.MAC != nil {
		rec.MAC = ep.MAC.String()
	}
	return json.Marshal(rec)
}

// loadEndpoints reads the endpoints of eb into attach. An endpoint whose
// allocation is gone (released by an older overlayd, which leaves the
// endpoint bucket alone) is deleted, and so is one that cannot be
// decoded: its allocation keeps its address, which is what matters, and
// loses its MAC address and labels rather than stop the network.
func loadEndpoints(eb *bolt.Bucket, attach map[overlay.AttachmentKey]entry) error {
	var stale [][]byte
	err := eb.ForEach(func(k, v []byte) error {
		key, err := decodeKey(k)
		e, ok := attach[key]
		if err != nil || !ok {
			stale = append(stale, k)
			return nil
		}
		var rec endpointRecord
		var mac net.HardwareAddr
		err = json.Unmarshal(v, &rec)
		if err == nil && rec.MAC != "" {
			mac, err = net.ParseMAC(rec.MAC)
		}
		ep := overlay.Endpoint{MAC: mac, Labels: rec.Labels}
		if err != nil || ep.Validate() != nil {
			stale = append(stale, k)
			return nil
		}
		e.ep = ep
		attach[key] = e
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range stale {
		if err := eb.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// Changed receives a value after allocations changed: the mirror's cue.
// Changes made while nobody receives are folded into one.
func (a *Allocator) Changed() <-chan struct{} { return a.changed }

func (a *Allocator) notify() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// Import records allocations read from elsewhere (etcd, on a host's
// first start with this file), skipping any whose key or address is
// already recorded, and flushes.
func (a *Allocator) Import(ctx context.Context, list []overlay.Allocation) error {
	a.mu.Lock()
	for _, al := range list {
		_, haveKey := a.attach[al.Key]
		_, haveAddr := a.used[al.Addr.Addr()]
		if !haveKey && !haveAddr {
			a.put(al.Key, entry{addr: al.Addr, ep: al.Endpoint.Clone()})
		}
	}
	a.mu.Unlock()
	if err := a.Flush(ctx); err != nil {
		return fmt.Errorf("import %d allocations of %s: %w", len(list), a.net.Name, err)
	}
	return nil
}

// put decides key's address and endpoint. a.mu is held.
func (a *Allocator) put(key overlay.AttachmentKey, e entry) {
	a.attach[key] = e
	a.used[e.addr.Addr()] = key
	a.inBlock[e.addr.Masked()]++
	a.pending = append(a.pending, change{key: key, entry: e})
	a.decided++
	a.notify()
}

// Flush returns once every allocation and release decided before it is
// committed to disk, or with the commit's error; the changes then stay
// queued, and the next Flush tries them again. Callers that answer
// somebody flush first.
func (a *Allocator) Flush(ctx context.Context) error {
	a.mu.Lock()
	target := a.decided
	a.mu.Unlock()
	select {
	case a.commit <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("flush allocations of %s: %w", a.net.Name, ctx.Err())
	}
	defer func() { <-a.commit }()
	a.mu.Lock()
	if a.flushed >= target { // a commit made while this one waited covered it
		a.mu.Unlock()
		return nil
	}
	batch := slices.Clone(a.pending)
	a.mu.Unlock()
	err := a.db.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketName(a.net.Name))
		eb := tx.Bucket(endpointBucketName(a.net.Name))
		for _, c := range batch {
			k, v := encode(c.key, c.entry.addr)
			if c.release || c.entry.ep.IsZero() {
				if err := eb.Delete(k); err != nil {
					return err
				}
			}
			if c.release {
				if err := b.Delete(k); err != nil {
					return err
				}
				continue
			}
			if err := b.Put(k, v); err != nil {
				return err
			}
			if !c.entry.ep.IsZero() {
				ev, err := encodeEndpoint(c.entry.ep)
				if err != nil {
					return fmt.Errorf("encode endpoint %s: %w", c.key, err)
				}
				if err := eb.Put(k, ev); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("flush allocations of %s to %s: %w", a.net.Name, a.db.path, err)
	}
	a.mu.Lock()
	a.pending = a.pending[len(batch):]
	a.flushed += uint64(len(batch))
	a.mu.Unlock()
	return nil
}

// Held returns the blocks it allocates from: those the host holds.
func (a *Allocator) Held() []netip.Prefix { return a.held() }

// blockSet returns blocks as a set.
func blockSet(blocks []netip.Prefix) map[netip.Prefix]bool {
	out := make(map[netip.Prefix]bool, len(blocks))
	for _, b := range blocks {
		out[b] = true
	}
	return out
}

// existing returns key's allocation, if it has one; one in a block this
// host no longer holds is an error wrapping overlay.ErrConflict. a.mu is
// held.
func (a *Allocator) existing(key overlay.AttachmentKey, held map[netip.Prefix]bool) (overlay.Allocation, bool, error) {
	e, ok := a.attach[key]
	if !ok {
		return overlay.Allocation{}, false, nil
	}
	if !held[e.addr.Masked()] {
		return overlay.Allocation{}, false, fmt.Errorf("%s holds %s, in block %s, which host %s no longer holds (the block was reclaimed or removed while the host was away; another host may hand the address out): recreate the container: %w",
			key, e.addr, e.addr.Masked(), a.host, overlay.ErrConflict)
	}
	return a.allocation(key, e), true, nil
}

// allocation returns key's allocation of e.
func (a *Allocator) allocation(key overlay.AttachmentKey, e entry) overlay.Allocation {
	return overlay.Allocation{Key: key, Addr: e.addr, Host: a.host, Endpoint: e.ep.Clone()}
}

// Allocate returns the address of key, allocating the lowest free
// address of the held blocks, with endpoint ep, when key holds none. The
// allocation is on disk once Flush returns.
func (a *Allocator) Allocate(ctx context.Context, key overlay.AttachmentKey, ep overlay.Endpoint) (overlay.Allocation, error) {
	if err := ctx.Err(); err != nil {
		return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", key, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	blocks := a.held()
	if al, ok, err := a.existing(key, blockSet(blocks)); ok || err != nil {
		return al, err
	}
	if len(blocks) == 0 {
		return overlay.Allocation{}, fmt.Errorf("allocate %s: host %s holds no block of %s: %w", key, a.host, a.net.Name, overlay.ErrPoolExhausted)
	}
	for _, b := range blocks {
		if a.inBlock[b] >= a.net.BlockCapacity() {
			continue
		}
		for addr := overlay.Gateway(b).Next(); addr != overlay.Broadcast(b); addr = addr.Next() {
			if _, taken := a.used[addr]; taken {
				continue
			}
			e := entry{addr: netip.PrefixFrom(addr, b.Bits()), ep: ep.Clone()}
			a.put(key, e)
			al := a.allocation(key, e)
			al.New = true
			return al, nil
		}
	}
	return overlay.Allocation{}, fmt.Errorf("allocate %s: every address of %s's blocks %v is in use: %w", key, a.host, blocks, overlay.ErrPoolExhausted)
}

// AllocateAddr gives key the address addr, which must be a free address of
// one of the held blocks (the CNI "ips" capability). A key that already
// holds addr gets it again; one that holds another address, or an address
// that is taken or outside the held blocks, is an error wrapping
// overlay.ErrConflict.
func (a *Allocator) AllocateAddr(ctx context.Context, key overlay.AttachmentKey, addr netip.Addr, ep overlay.Endpoint) (overlay.Allocation, error) {
	if err := ctx.Err(); err != nil {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: %w", addr, key, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	blocks := a.held()
	held := blockSet(blocks)
	al, ok, err := a.existing(key, held)
	switch {
	case err != nil:
		return overlay.Allocation{}, fmt.Errorf("allocate %s: %w", addr, err)
	case ok && al.Addr.Addr() == addr:
		return al, nil
	case ok:
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: it already holds %s: %w", addr, key, al.Addr, overlay.ErrConflict)
	}
	b := netip.PrefixFrom(addr, a.net.BlockBits).Masked()
	if !held[b] || addr == b.Addr() || addr == overlay.Gateway(b) || addr == overlay.Broadcast(b) {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: not a container address of this host's blocks %v: %w", addr, key, blocks, overlay.ErrConflict)
	}
	if holder, taken := a.used[addr]; taken {
		return overlay.Allocation{}, fmt.Errorf("allocate %s for %s: the address is in use by %s: %w", addr, key, holder, overlay.ErrConflict)
	}
	e := entry{addr: netip.PrefixFrom(addr, b.Bits()), ep: ep.Clone()}
	a.put(key, e)
	al = a.allocation(key, e)
	al.New = true
	return al, nil
}

// Release frees the address of key; the release is on disk once Flush
// returns. A key without one is not an error.
func (a *Allocator) Release(ctx context.Context, key overlay.AttachmentKey) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("release %s: %w", key, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.attach[key]
	if !ok {
		return nil
	}
	delete(a.attach, key)
	delete(a.used, e.addr.Addr())
	if a.inBlock[e.addr.Masked()]--; a.inBlock[e.addr.Masked()] <= 0 {
		delete(a.inBlock, e.addr.Masked())
	}
	a.pending = append(a.pending, change{key: key, entry: e, release: true})
	a.decided++
	a.notify()
	return nil
}

// Lookup returns the allocation of key: an error wrapping
// overlay.ErrNotFound when it has none, or overlay.ErrConflict when its
// address is in a block this host no longer holds.
func (a *Allocator) Lookup(ctx context.Context, key overlay.AttachmentKey) (overlay.Allocation, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	al, ok, err := a.existing(key, blockSet(a.held()))
	switch {
	case err != nil:
		return overlay.Allocation{}, fmt.Errorf("look up %s: %w", key, err)
	case !ok:
		return overlay.Allocation{}, fmt.Errorf("look up %s on %s: %w", key, a.host, overlay.ErrNotFound)
	}
	return al, nil
}

// Count returns how many addresses of block b are allocated.
func (a *Allocator) Count(b netip.Prefix) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inBlock[b]
}

// Stranded returns the allocations in blocks this host no longer holds,
// by address: containers whose addresses another host may hand out, that
// must be recreated. Releasing them (DEL or GC) is how they go.
func (a *Allocator) Stranded() []overlay.Allocation {
	a.mu.Lock()
	defer a.mu.Unlock()
	held := blockSet(a.held())
	var out []overlay.Allocation
	for k, e := range a.attach {
		if !held[e.addr.Masked()] {
			out = append(out, a.allocation(k, e))
		}
	}
	slices.SortFunc(out, func(x, y overlay.Allocation) int { return x.Addr.Addr().Compare(y.Addr.Addr()) })
	return out
}

// List returns every allocation of this host in the network, by address.
func (a *Allocator) List(ctx context.Context) ([]overlay.Allocation, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]overlay.Allocation, 0, len(a.attach))
	for k, e := range a.attach {
		out = append(out, a.allocation(k, e))
	}
	slices.SortFunc(out, func(x, y overlay.Allocation) int { return x.Addr.Addr().Compare(y.Addr.Addr()) })
	return out, nil
}
