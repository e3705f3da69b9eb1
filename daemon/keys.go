package daemon

import (
	"context"

	"github.com/overlaynet/overlay/gossip"
)

// reloadKeys reads the gossip key file again after every value of reload,
// until ctx is done. A file that cannot be read, or whose keys gossip
// refuses, leaves the keys in use as they are.
func (h *host) reloadKeys(ctx context.Context, reload <-chan struct{}) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-reload:
		}
		if h.cfg.GossipKeyFile == "" {
			h.log.Warn("asked to reload the gossip keys, but no --gossip-key-file is set")
			continue
		}
		keys, err := gossip.LoadKeys(h.cfg.GossipKeyFile)
		if err == nil {
			err = h.gossip.SetKeys(keys)
		}
		if err != nil {
			h.log.Error("reloading the gossip keys failed; the keys in use stay", "file", h.cfg.GossipKeyFile, "err", err)
			continue
		}
		h.log.Info("gossip keys reloaded", "file", h.cfg.GossipKeyFile, "keys", len(keys))
	}
}
