package daemon

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// mirrorDelay is how long the mirror lets changes gather before it copies
// them. A failed copy is tried again mirrorRetry later at most, spread down
// to half of it (mirrorRetryJitter) so that hosts failed by the same etcd
// outage do not retry in lockstep.
const (
	mirrorDelay       = 100 * time.Millisecond
	mirrorRetry       = time.Second
	mirrorRetryJitter = 0.5
)

// mirrorSource is the host's own record of a network's allocations
// (local.Allocator).
type mirrorSource interface {
	// Changed receives a value after allocations changed.
	Changed() <-chan struct{}
	// List returns every allocation.
	List(ctx context.Context) ([]overlay.Allocation, error)
}

// mirrorTarget is etcd's copy of them (etcd.Pool).
type mirrorTarget interface {
	// Mirror makes the copy equal to list and returns the keys changed.
	Mirror(ctx context.Context, list []overlay.Allocation) (int, error)
}

// mirrorLoop copies a network's allocations on this host to etcd.
type mirrorLoop struct {
	from   mirrorSource
	to     mirrorTarget
	resync time.Duration
	failed func() // counts a failed copy
	log    *slog.Logger

	// mirrored is when the mirror last copied the allocations to etcd
	// (Unix nanoseconds), 0 before the first copy.
	mirrored atomic.Int64
}

// Run copies the allocations until ctx is done: at once, mirrorDelay
// after a change (so that a burst of ADDs and DELs costs one etcd
// transaction, not one each, and etcd's disk writes stay out of the way
// of the ADDs'), every resync interval, and within a second after a
// failed copy (etcd down). It returns ctx's error.
func (m *mirrorLoop) Run(ctx context.Context) error {
	tick := time.NewTicker(m.resync)
	defer tick.Stop()
	pass := time.NewTimer(0)
	defer pass.Stop()
	scheduled := true
	var failingSince time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.from.Changed():
			if !scheduled {
				pass.Reset(mirrorDelay)
				scheduled = true
			}
			continue
		case <-tick.C:
		case <-pass.C:
			scheduled = false
		}
		mctx, cancel := context.WithTimeout(ctx, storeTimeout)
		list, err := m.from.List(mctx)
		var n int
		if err == nil {
			n, err = m.to.Mirror(mctx, list)
		}
		cancel()
		if err == nil {
			m.mirrored.Store(time.Now().UnixNano())
		}
		switch {
		case err != nil && ctx.Err() == nil:
			m.failed()
			if failingSince.IsZero() {
				failingSince = time.Now()
				m.log.Warn("copying allocations to etcd failed; retrying within a second (allocation goes on from this host's own record)", "err", err)
			}
			pass.Reset(backoff.Jitter(mirrorRetry, mirrorRetryJitter, rand.Float64()))
			scheduled = true
		case err == nil && !failingSince.IsZero():
			m.log.Info("allocations copied to etcd again", "after", time.Since(failingSince).Round(time.Second), "changed", n)
			failingSince = time.Time{}
		case err == nil && n > 0:
			m.log.Debug("allocations copied to etcd", "changed", n)
		}
	}
}

// reclaimInterval returns how often the host looks for blocks of gone
// hosts to free: every verify interval, or four times a reclaim period
// shorter than that, but at most once a second.
func reclaimInterval(cfg Config) time.Duration {
	return max(time.Second, min(cfg.VerifyInterval, cfg.ReclaimAfter/4))
}

// reclaimLoop frees the blocks of a network whose owners' liveness keys
// have been gone for the reclaim period. Every host runs it; the
// transactions are fenced, so two hosts freeing the same block, or an
// owner coming back meanwhile, is safe.
type reclaimLoop struct {
	// reclaim frees what is due at now (etcd.Store.Reclaim).
	reclaim  func(ctx context.Context, now time.Time) ([]etcd.Reclaimed, error)
	interval time.Duration
	after    time.Duration // the reclaim period, for the log
	kick     func()        // asks the reconciler for a pass
	log      *slog.Logger

	// reclaimed counts the blocks of gone hosts this host freed.
	reclaimed atomic.Uint64
}

// Run looks every interval, jittered down to half of it so that hosts do
// not look in lockstep, until ctx is done, and returns ctx's error.
func (l *reclaimLoop) Run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff.Jitter(l.interval, 0.5, rand.Float64())):
		}
		l.pass(ctx)
	}
}

// pass makes one look.
func (l *reclaimLoop) pass(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, storeTimeout)
	freed, err := l.reclaim(rctx, time.Now())
	cancel()
	if err != nil && ctx.Err() == nil {
		l.log.Warn("looking for blocks of gone hosts failed; will retry", "err", err)
	}
	byOwner := make(map[overlay.HostID][]netip.Prefix)
	since := make(map[overlay.HostID]time.Time)
	for _, f := range freed {
		byOwner[f.Owner] = append(byOwner[f.Owner], f.Block)
		since[f.Owner] = f.GoneSince
	}
	for owner, blocks := range byOwner {
		l.log.Warn("freed the blocks of a host whose liveness key is gone for longer than the reclaim period",
			"owner", owner, "blocks", blocks, "gone-since", since[owner].Format(time.RFC3339), "reclaim-after", l.after)
	}
	if len(freed) > 0 {
		l.reclaimed.Add(uint64(len(freed)))
		l.kick()
	}
}
