package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/firewall"
	"github.com/overlaynet/overlay/overlay/vxlan"
)

// Teardown removes this host from the overlay for good: it releases the
// host's blocks and addresses of every network in etcd, deletes its host
// record and removes the networks' devices. The other hosts then remove
// their routes, neighbour and FDB entries for it. overlayd must be
// stopped first.
func Teardown(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if c, err := net.DialTimeout("unix", cfg.Socket, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("overlayd is running (it answers on %s): stop it before tearing the host down", cfg.Socket)
	}
	if _, err := os.Stat(filepath.Join(cfg.DataDir, hostIDFile)); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no host identity in %s: nothing to tear down", cfg.DataDir)
	}
	host, err := LoadIdentity(cfg.DataDir)
	if err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	allocs, err := local.Open(filepath.Join(cfg.DataDir, AllocationsFile), host)
	if err != nil {
		return fmt.Errorf("teardown: %w", err)
	}
	defer allocs.Close()
	conn := connectEtcd(ctx, cfg)
	if conn.err != nil {
		return conn.err
	}
	defer conn.close()
	store := etcd.NewStore(conn.cli, cfg.EtcdPrefix)
	networks, err := store.Networks(ctx)
	if err != nil && networks == nil {
		return fmt.Errorf("teardown: %w", err)
	}
	if cfg.Network.Name != "" && !slices.ContainsFunc(networks, func(n overlay.Network) bool { return n.Name == cfg.Network.Name }) {
		// Listed by no host of this release yet.
		if n, err := store.Network(ctx, cfg.Network.Name); err == nil {
			networks = append(networks, n)
		}
	}
	// An overlayd of one of these networks in this namespace, whatever
	// its data directory and socket, holds its lock: its devices are not
	// ours to remove.
	for _, n := range networks {
		lock, err := lockNetwork(n.Name)
		if err != nil {
			return fmt.Errorf("teardown: %w: stop it first", err)
		}
		defer lock.Unlock()
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("teardown: netlink: %w", err)
	}
	defer h.Close()
	dp := vxlan.New(h, nil, log)

	var errs []error
	var names []string
	for _, n := range networks {
		names = append(names, n.Name)
		// The host's own record goes only once etcd has let go of its
		// blocks: until then a restarted overlayd must still know what
		// it gave out.
		if err := store.Pool(n, host).ReleaseBlocks(ctx); err != nil {
			errs = append(errs, err)
		} else if err := allocs.Drop(n.Name); err != nil {
			errs = append(errs, err)
		}
		if err := dp.Delete(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	if fw, err := firewall.New(); err != nil {
		errs = append(errs, err)
	} else if err := fw.Delete(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		if err := store.DeleteHost(ctx, host); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("teardown of host %s: %w", host, err)
	}
	log.Info("host torn down: blocks released, devices removed", "host", host, "networks", names)
	return nil
}
