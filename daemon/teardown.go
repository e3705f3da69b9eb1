package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay/vxlan"
)

// Teardown removes this host from the overlay for good: it releases the
// host's blocks and addresses in etcd, deletes its host record and
// removes the network's devices. The other hosts then remove their routes,
// neighbour and FDB entries for it. overlayd must be stopped first.
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
	// An overlayd of this network in this namespace, whatever its data
	// directory and socket, holds the lock: its devices are not ours to
	// remove.
	lock, err := lockNetwork(cfg.Network.Name)
	if err != nil {
		return fmt.Errorf("teardown: %w: stop it first", err)
	}
	defer lock.Unlock()
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
	network, err := store.Network(ctx, cfg.Network.Name)
	if err != nil {
		return fmt.Errorf("teardown: %w", err)
	}

	var errs []error
	// The host's own record goes only once etcd has let go of its blocks:
	// until then a restarted overlayd must still know what it gave out.
	if err := store.Pool(network, host).ReleaseBlocks(ctx); err != nil {
		errs = append(errs, err)
	} else if err := allocs.Drop(network.Name); err != nil {
		errs = append(errs, err)
	}
	if err := store.DeleteHost(ctx, host); err != nil {
		errs = append(errs, err)
	}
	h, err := netlink.NewHandle()
	if err != nil {
		errs = append(errs, fmt.Errorf("netlink: %w", err))
	} else {
		defer h.Close()
		if err := vxlan.New(h, log).Delete(ctx, network); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("teardown of host %s: %w", host, err)
	}
	log.Info("host torn down: blocks released, devices removed", "host", host, "network", network.Name)
	return nil
}
