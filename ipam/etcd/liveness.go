package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/overlay"
)

// DefaultLivenessTTL is the TTL of the lease a host's liveness key is
// bound to: the key goes this long after the host stops renewing it (it
// died, or lost etcd).
const DefaultLivenessTTL = 10 * time.Second

// DefaultReclaimAfter is how long a host's liveness key must have been
// gone before its blocks can be reclaimed.
const DefaultReclaimAfter = 24 * time.Hour

// LiveRecord is the value of a host's liveness key.
type LiveRecord struct {
	// Host is the host whose key it is.
	Host overlay.HostID `json:"host"`
	// Since is when the host created the key.
	Since time.Time `json:"since"`
}

// GoneRecord is the value of a host's gone key: written by the first host
// that saw the liveness key of a block owner gone, deleted by the owner
// when it creates its liveness key again. The reclaim period is counted
// from Since.
type GoneRecord struct {
	// Host is the host whose liveness key is gone.
	Host overlay.HostID `json:"host"`
	// Since is when the liveness key was first seen gone, by the clock
	// of NoticedBy.
	Since time.Time `json:"since"`
	// NoticedBy is the host that saw it.
	NoticedBy overlay.HostID `json:"noticedBy"`
}

func (s *Store) liveKey(h overlay.HostID) string { return s.prefix + "live/" + string(h) }
func (s *Store) goneKey(h overlay.HostID) string { return s.prefix + "gone/" + string(h) }

// Liveness keeps one host's liveness key in etcd: a key bound to a lease
// that the host keeps alive. The key says the host is up; nothing the host
// owns is bound to the lease, so losing it (a quorum loss outlasts its TTL)
// changes no owner: Run creates the key again as soon as etcd answers.
type Liveness struct {
	s    *Store
	host overlay.HostID
	ttl  time.Duration
	log  *slog.Logger

	lost  atomic.Uint64 // times the key was lost and had to be created again
	alive atomic.Bool   // the key exists as far as this host knows
	since atomic.Int64  // when the current key was created, Unix nanoseconds
}

// Liveness returns the liveness keeper of host; ttl 0 means
// DefaultLivenessTTL, and a nil log discards its logs.
func (s *Store) Liveness(host overlay.HostID, ttl time.Duration, log *slog.Logger) *Liveness {
	if ttl <= 0 {
		ttl = DefaultLivenessTTL
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Liveness{s: s, host: host, ttl: ttl, log: log}
}

// Lost returns how many times the key was lost and created again.
func (l *Liveness) Lost() uint64 { return l.lost.Load() }

// Alive reports whether the key exists, as far as this host knows.
func (l *Liveness) Alive() bool { return l.alive.Load() }

// Create grants a lease and creates the liveness key on it, deleting the
// host's gone key in the same transaction, so that no reclaim fenced on
// the key's absence can commit after it. It returns the lease.
func (l *Liveness) Create(ctx context.Context) (clientv3.LeaseID, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	lease, err := l.s.cli.Grant(ctx, int64(l.ttl/time.Second))
	if err != nil {
		return 0, fmt.Errorf("liveness of %s: grant a lease: %w", l.host, err)
	}
	now := time.Now().UTC()
	val, err := json.Marshal(LiveRecord{Host: l.host, Since: now})
	if err != nil {
		return 0, fmt.Errorf("liveness of %s: encode: %w", l.host, err)
	}
	if _, err := l.s.cli.Txn(ctx).Then(
		clientv3.OpPut(l.s.liveKey(l.host), string(val), clientv3.WithLease(lease.ID)),
		clientv3.OpDelete(l.s.goneKey(l.host)),
	).Commit(); err != nil {
		return 0, fmt.Errorf("liveness of %s: create the key: %w", l.host, err)
	}
	l.since.Store(now.UnixNano())
	l.alive.Store(true)
	return lease.ID, nil
}

// livenessRetry is the longest wait before a failed creation of the key is
// tried again, spread down to half of it.
const (
	livenessRetry       = time.Second
	livenessRetryJitter = 0.5
)

// Run keeps the liveness key until ctx is done: it keeps lease alive
// (from Create; 0 makes Run create the key first) and, whenever the lease
// is lost, creates the key again on a new one. It returns ctx's error.
func (l *Liveness) Run(ctx context.Context, lease clientv3.LeaseID) error {
	for {
		for lease == 0 {
			var err error
			if lease, err = l.Create(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(backoff.Jitter(livenessRetry, livenessRetryJitter, rand.Float64())):
				}
				continue
			}
			if n := l.lost.Load(); n > 0 {
				l.log.Info("liveness key created again; no block changed owner", "host", l.host, "times lost", n)
			}
		}
		kctx, cancel := context.WithCancel(ctx)
		ch, err := l.s.cli.KeepAlive(kctx, lease)
		if err == nil {
			for range ch {
			}
		}
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// The lease expired (etcd lost its quorum for longer than the
		// TTL, or did not hear from this host), or was revoked.
		l.alive.Store(false)
		l.lost.Add(1)
		l.log.Warn("liveness key lost; creating it again (blocks are not bound to it and keep their owner)", "host", l.host, "err", err)
		lease = 0
	}
}

// Reclaimed is a block freed by Reclaim.
type Reclaimed struct {
	// Block is the block, Owner the host it was taken from.
	Block netip.Prefix
	Owner overlay.HostID
	// GoneSince is when the owner's liveness key was first seen gone.
	GoneSince time.Time
}

// Reclaim frees the blocks of network n whose owner's liveness key has
// been gone for at least after, and notes, for an owner whose key is gone
// and who has no gone key yet, that it was gone at now (by self's clock).
// Each owner's blocks are freed, with etcd's copy of their addresses, in
// one transaction that commits only if the owner's liveness key is still
// absent and its gone key and its blocks unchanged since they were read:
// an owner that came back in between keeps its blocks. It returns the
// blocks freed.
func (s *Store) Reclaim(ctx context.Context, n overlay.Network, self overlay.HostID, after time.Duration, now time.Time) ([]Reclaimed, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	// One read, so that blocks, liveness and gone keys are of one
	// revision.
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.blocksPrefix(n.Name), clientv3.WithPrefix()),
		clientv3.OpGet(s.prefix+"live/", clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.prefix+"gone/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("reclaim blocks of %s: %w", n.Name, err)
	}
	blocks := make(map[overlay.HostID][]blockKV)
	valid := func(b netip.Prefix) bool { return n.BlockIndex(b) >= 0 }
	for _, kv := range decodeBlocks(s.blocksPrefix(n.Name), resp.Responses[0].GetResponseRange().Kvs, valid) {
		if kv.rec.Host != unknownOwner { // never reclaim over a record that cannot be read
			blocks[kv.rec.Host] = append(blocks[kv.rec.Host], kv)
		}
	}
	live := make(map[overlay.HostID]bool)
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		live[overlay.HostID(strings.TrimPrefix(string(kv.Key), s.prefix+"live/"))] = true
	}
	type gone struct {
		rec    GoneRecord
		modRev int64
	}
	gones := make(map[overlay.HostID]gone)
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		var rec GoneRecord
		if json.Unmarshal(kv.Value, &rec) != nil {
			continue
		}
		gones[overlay.HostID(strings.TrimPrefix(string(kv.Key), s.prefix+"gone/"))] = gone{rec: rec, modRev: kv.ModRevision}
	}

	var out []Reclaimed
	var errs []error
	for owner, list := range blocks {
		if live[owner] || owner == self {
			continue
		}
		liveKey, goneKey := s.liveKey(owner), s.goneKey(owner)
		g, ok := gones[owner]
		if !ok {
			val, err := json.Marshal(GoneRecord{Host: owner, Since: now.UTC(), NoticedBy: self})
			if err != nil {
				return out, fmt.Errorf("encode gone record: %w", err)
			}
			if _, err := s.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.CreateRevision(liveKey), "=", 0), clientv3.Compare(clientv3.CreateRevision(goneKey), "=", 0)).
				Then(clientv3.OpPut(goneKey, string(val))).
				Commit(); err != nil {
				errs = append(errs, fmt.Errorf("note that %s is gone: %w", owner, err))
			}
			continue
		}
		if now.Sub(g.rec.Since) < after {
			continue
		}
		// At most maxReclaimBlocks blocks a transaction, under etcd's
		// default limit of 128 operations.
		for len(list) > 0 {
			chunk := list[:min(len(list), maxReclaimBlocks)]
			list = list[len(chunk):]
			cmps := []clientv3.Cmp{
				clientv3.Compare(clientv3.CreateRevision(liveKey), "=", 0),
				clientv3.Compare(clientv3.ModRevision(goneKey), "=", g.modRev),
			}
			var ops []clientv3.Op
			for _, b := range chunk {
				key := s.blockKey(n.Name, b.block)
				cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", b.modRev))
				ops = append(ops, clientv3.OpDelete(key), clientv3.OpDelete(s.addrsPrefix(n.Name, b.block), clientv3.WithPrefix()))
			}
			tr, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
			if err != nil {
				errs = append(errs, fmt.Errorf("reclaim blocks of %s: %w", owner, err))
				break
			}
			if !tr.Succeeded {
				break // the owner came back, or something changed: look again next time
			}
			for _, b := range chunk {
				out = append(out, Reclaimed{Block: b.block, Owner: owner, GoneSince: g.rec.Since})
			}
		}
	}
	return out, errors.Join(errs...)
}

// maxReclaimBlocks bounds the blocks one reclaim transaction frees: two
// deletions and a compare each.
const maxReclaimBlocks = 40

// ErrHostAlive is wrapped by the error of RemoveHost for a host whose
// liveness key exists.
var ErrHostAlive = errors.New("etcd: host is alive")

// Removed is what RemoveHost deleted.
type Removed struct {
	// Blocks are the host's blocks, by network, freed with their
	// addresses.
	Blocks map[string][]netip.Prefix
	// Record is whether the host had a host record.
	Record bool
}

// RemoveHost removes host h from etcd at once, in one transaction: its
// blocks in every network with etcd's copy of their addresses, its
// attachment indexes, its host record, its gone key, its doctor report
// and its Docker driver's records. It refuses, with
// an error wrapping ErrHostAlive, while h's liveness key exists (its
// overlayd runs, or stopped less than the liveness TTL ago), and the
// transaction commits only if that is still so and the blocks are
// unchanged. A host that etcd does not know is not an error.
func (s *Store) RemoveHost(ctx context.Context, h overlay.HostID) (Removed, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	out := Removed{Blocks: make(map[string][]netip.Prefix)}
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.liveKey(h)),
		clientv3.OpGet(s.prefix+"networks/", clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.hostKey(h), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return out, fmt.Errorf("remove host %s: %w", h, err)
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		var rec LiveRecord
		_ = json.Unmarshal(kvs[0].Value, &rec)
		return out, fmt.Errorf("remove host %s: its liveness key exists (created %s): its overlayd is running, or stopped less than %s ago; stop it, or run overlayd teardown on it: %w",
			h, rec.Since.Format(time.RFC3339), DefaultLivenessTTL, ErrHostAlive)
	}
	out.Record = len(resp.Responses[2].GetResponseRange().Kvs) > 0
	var networks []string
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		rest := strings.TrimPrefix(string(kv.Key), s.prefix+"networks/")
		if name, ok := strings.CutSuffix(rest, "/config"); ok && !strings.Contains(name, "/") {
			networks = append(networks, name)
		}
	}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.liveKey(h)), "=", 0)}
	ops := []clientv3.Op{clientv3.OpDelete(s.hostKey(h)), clientv3.OpDelete(s.goneKey(h)), clientv3.OpDelete(s.reportKey(h)),
		clientv3.OpDelete(s.dockerPrefix(h), clientv3.WithPrefix())}
	for _, name := range networks {
		bresp, err := s.cli.Get(ctx, s.blocksPrefix(name), clientv3.WithPrefix())
		if err != nil {
			return out, fmt.Errorf("remove host %s: list blocks of %s: %w", h, name, err)
		}
		ops = append(ops, clientv3.OpDelete(s.attachPrefix(name, h), clientv3.WithPrefix()))
		for b, kv := range decodeBlocks(s.blocksPrefix(name), bresp.Kvs, nil) {
			if kv.rec.Host != h {
				continue
			}
			key := s.blockKey(name, b)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", kv.modRev))
			ops = append(ops, clientv3.OpDelete(key), clientv3.OpDelete(s.addrsPrefix(name, b), clientv3.WithPrefix()))
			out.Blocks[name] = append(out.Blocks[name], b)
		}
	}
	tr, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return out, fmt.Errorf("remove host %s: %w", h, err)
	}
	if !tr.Succeeded {
		return out, fmt.Errorf("remove host %s: it came back or its blocks changed while it was being removed; try again: %w", h, overlay.ErrConflict)
	}
	return out, nil
}
