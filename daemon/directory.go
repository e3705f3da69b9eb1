package daemon

import (
	"context"
	"errors"
	"log/slog"
	"sync"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// hostDirectory is the overlay.HostDirectory of the host records in etcd.
// A record that cannot be decoded is logged (once per distinct error) and
// left out. It is safe for concurrent use.
type hostDirectory struct {
	store *etcd.Store
	log   *slog.Logger

	mu      sync.Mutex // guards lastBad
	lastBad string     // the last decoding error logged
}

var _ overlay.HostDirectory = (*hostDirectory)(nil)

// Hosts returns every host record in etcd that can be decoded.
func (d *hostDirectory) Hosts(ctx context.Context) ([]overlay.HostInfo, error) {
	recs, err := d.store.Hosts(ctx)
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
