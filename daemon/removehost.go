package daemon

import (
	"context"
	"fmt"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// RemoveHost removes host id, which is gone for good, from etcd at once:
// its blocks (freed, with their addresses), its attachment index and its
// host record; every other host then removes its routes. It refuses a host
// whose liveness key exists. It runs from any host that reaches etcd: with
// no etcd endpoints configured it connects to the embedded etcd's client
// URL as a client, rather than starting one.
func RemoveHost(ctx context.Context, cfg Config, id overlay.HostID) error {
	cfg = cfg.withDefaults()
	ecfg := cfg.Etcd
	if len(ecfg.Endpoints) == 0 {
		ecfg.Endpoints = []string{cfg.EmbeddedClientURL}
	}
	cli, err := etcd.Connect(ctx, ecfg)
	if err != nil {
		return err
	}
	defer cli.Close()
	removed, err := etcd.NewStore(cli, cfg.EtcdPrefix).RemoveHost(ctx, id)
	if err != nil {
		return err
	}
	if !removed.Record && len(removed.Blocks) == 0 {
		return fmt.Errorf("remove host %s: etcd has no record and no block of it: check the host ID (overlayd logs it as host=) and --etcd-prefix", id)
	}
	cfg.Logger.Info("host removed: its blocks are free and the other hosts remove its routes", "host", id, "blocks", removed.Blocks)
	return nil
}
