package simnet

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// Store returns the store of the run's etcd (host 1's embedded one, which
// must be running) and a func that closes its client.
func (n *Net) Store(ctx context.Context) (*etcd.Store, func() error, error) {
	cli, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: []string{n.EtcdEndpoint()}})
	if err != nil {
		return nil, nil, err
	}
	return etcd.NewStore(cli, ""), cli.Close, nil
}

// goneBase is the first underlay address of the hosts RegisterGoneHosts
// makes up: in the underlay's range, held by no simulated host, so that
// joining them times out.
var goneBase = netip.MustParseAddr("198.18.0.201")

// RegisterGoneHosts writes the host records of count hosts that do not
// exist (a machine gone without teardown): underlay addresses nobody
// holds, gossip on port 7946. It returns their IDs, for DeleteHost.
func RegisterGoneHosts(ctx context.Context, store *etcd.Store, count int) ([]overlay.HostID, error) {
	var ids []overlay.HostID
	addr := goneBase
	for i := range count {
		id := overlay.HostID(fmt.Sprintf("gone%d", i))
		rec := etcd.HostRecord{Host: id, Underlay: addr, VTEPMAC: fmt.Sprintf("02:00:00:00:%02x:%02x", i>>8, i&0xff),
			Gossip: netip.AddrPortFrom(addr, 7946).String(), Updated: time.Now().UTC()}
		if err := store.RegisterHost(ctx, rec); err != nil {
			return ids, err
		}
		ids = append(ids, id)
		addr = addr.Next()
	}
	return ids, nil
}
