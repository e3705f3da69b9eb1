package daemon

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// hostDirectory is the overlay.HostDirectory of the host records in etcd,
// shared by every network's reconciler. A record that cannot be decoded
// is logged (once per distinct error) and left out.
//
// Reads are shared the way a group commit shares a sync: a call waits for
// the read in flight, if any, and is answered by the next one, which
// starts after the call arrived and so sees every record written before
// it. The networks whose passes run at once (one gossip event kicks them
// all) read hosts/ once or twice between them, not once each. It is safe
// for concurrent use.
type hostDirectory struct {
	read func(context.Context) ([]etcd.HostRecord, error) // etcd.Store.Hosts
	log  *slog.Logger

	mu      sync.Mutex // guards the fields below
	lastBad string     // the last decoding error logged
	next    *hostRead  // the read the calls arriving now share, not started yet
	running bool       // a goroutine runs the reads
	// last are the hosts of the last read that succeeded.
	last []overlay.HostInfo
}

// hostRead is one read of the host records and those waiting for it.
type hostRead struct {
	done    chan struct{} // closed once hosts and err are set
	waiting int           // calls that joined it; guarded by hostDirectory.mu
	hosts   []overlay.HostInfo
	err     error
}

var _ overlay.HostDirectory = (*hostDirectory)(nil)

func newHostDirectory(store *etcd.Store, log *slog.Logger) *hostDirectory {
	return &hostDirectory{read: store.Hosts, log: log}
}

// hostReadTimeout bounds one shared read, which no one caller's context
// bounds: as long as a pass waits for its reads of the store (the
// reconciler's bound), so that a read that hangs is given up as soon as
// the passes waiting for it are, and the next pass starts a fresh one.
const hostReadTimeout = 3 * time.Second

// Hosts returns every host record in etcd that can be decoded, from a
// read that started after the call.
func (d *hostDirectory) Hosts(ctx context.Context) ([]overlay.HostInfo, error) {
	d.mu.Lock()
	if d.next == nil {
		d.next = &hostRead{done: make(chan struct{})}
	}
	r := d.next
	r.waiting++
	if !d.running {
		d.running = true
		go d.run(context.WithoutCancel(ctx))
	}
	d.mu.Unlock()
	select {
	case <-r.done:
		return slices.Clone(r.hosts), r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Known returns the hosts registered in etcd as of the last read that
// succeeded, without reading etcd; nil before the first.
func (d *hostDirectory) Known() []overlay.HostID {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.last == nil {
		return nil
	}
	known := make([]overlay.HostID, len(d.last))
	for i, h := range d.last {
		known[i] = h.Host
	}
	return known
}

// Records returns the host records of the last read that succeeded,
// sorted by host ID, without reading etcd; nil before the first.
func (d *hostDirectory) Records() []overlay.HostInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := slices.Clone(d.last)
	slices.SortFunc(out, func(a, b overlay.HostInfo) int { return strings.Compare(string(a.Host), string(b.Host)) })
	return out
}

// run makes the reads that calls wait for, one after another, until none
// waits.
func (d *hostDirectory) run(ctx context.Context) {
	for {
		d.mu.Lock()
		r := d.next
		d.next = nil
		if r == nil {
			d.running = false
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		rctx, cancel := context.WithTimeout(ctx, hostReadTimeout)
		r.hosts, r.err = d.hosts(rctx)
		cancel()
		if r.err == nil {
			d.mu.Lock()
			d.last = r.hosts
			d.mu.Unlock()
		}
		close(r.done)
	}
}

// hosts reads the host records.
func (d *hostDirectory) hosts(ctx context.Context) ([]overlay.HostInfo, error) {
	recs, err := d.read(ctx)
	if err != nil && !errors.Is(err, etcd.ErrBadRecord) {
		return nil, err
	}
	if err != nil {
		d.mu.Lock()
		repeated := err.Error() == d.lastBad
		d.lastBad = err.Error()
		d.mu.Unlock()
		if !repeated {
			d.log.Warn("leaving out host records that cannot be decoded", "err", err)
		}
	}
	out := make([]overlay.HostInfo, 0, len(recs))
	for _, r := range recs {
		mac, _ := r.MAC() // Hosts left out the records whose MAC is malformed
		out = append(out, overlay.HostInfo{Host: r.Host, Underlay: r.Underlay, VTEPMAC: mac, Registered: r.Updated})
	}
	return out, nil
}
