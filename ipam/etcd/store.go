// Package etcd keeps the overlay's shared state in etcd: network
// definitions, host records, block leases and address allocations.
//
// Key layout, below a prefix (DefaultPrefix):
//
//	hosts/<host-id>                               HostRecord
//	live/<host-id>                                LiveRecord, bound to the host's lease
//	gone/<host-id>                                GoneRecord: since when live/ was seen gone
//	netdefs/<net>                                 overlay.Network: the list of networks
//	networks/<net>/config                         overlay.Network, the same (read by older hosts)
//	networks-generation                           the last network created or deleted (a fence)
//	networks/<net>/blocks/<a.b.c.d-bits>          BlockRecord
//	networks/<net>/addrs/<a.b.c.d-bits>/<ip>      AddrRecord
//	networks/<net>/attach/<host>/<container>/<if> the address, as text
//
// Every ownership change is one transaction that compares create or
// modification revisions, so no block or address is ever handed out twice,
// however many hosts race for it.
package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/overlay"
)

// DefaultPrefix is the etcd key prefix of all overlay state. The version
// in it changes only with an incompatible key layout.
const DefaultPrefix = "/overlay/v1/"

// requestTimeout bounds a Store or Pool method called with a context
// that has no deadline: the etcd client waits for a connection for as
// long as the context lets it, and a method must not wait forever for a
// cluster that is down. It is longer than etcd's own bound on a request
// it has accepted (5 s and two election timeouts by default), so it only
// cuts requests that etcd never answers.
const requestTimeout = 10 * time.Second

// bound returns ctx, with a deadline requestTimeout from now if it had
// none.
func bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, requestTimeout)
}

// Store reads and writes overlay state in etcd. It is safe for concurrent
// use. Its methods block on etcd until it answers or ctx is done, and
// never longer than requestTimeout (10 s) when ctx has no deadline,
// but for WatchNetwork, which runs until ctx is done: a caller that needs
// an answer sooner, such as a reconcile pass, bounds ctx itself. During an outage they fail when ctx is done; the caller
// retries.
type Store struct {
	cli    *clientv3.Client
	prefix string
}

// NewStore returns a store on cli below prefix ("" means DefaultPrefix).
func NewStore(cli *clientv3.Client, prefix string) *Store {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return &Store{cli: cli, prefix: prefix}
}

// Client returns the etcd client the store uses.
func (s *Store) Client() *clientv3.Client { return s.cli }

func (s *Store) hostKey(h overlay.HostID) string { return s.prefix + "hosts/" + string(h) }

// networksGenKey changes with every network created: a creation is fenced
// on it, so that two overlapping networks created at once cannot both be.
func (s *Store) networksGenKey() string        { return s.prefix + "networks-generation" }
func (s *Store) networkKey(name string) string { return s.prefix + "networks/" + name + "/config" }
func (s *Store) netdefsPrefix() string         { return s.prefix + "netdefs/" }
func (s *Store) netdefKey(name string) string  { return s.netdefsPrefix() + name }
func (s *Store) networkPrefix(name string) string {
	return s.prefix + "networks/" + name + "/"
}
func (s *Store) attachNetPrefix(name string) string {
	return s.prefix + "networks/" + name + "/attach/"
}
func (s *Store) blocksPrefix(name string) string {
	return s.prefix + "networks/" + name + "/blocks/"
}
func (s *Store) blockKey(name string, b netip.Prefix) string {
	return s.blocksPrefix(name) + blockName(b)
}
func (s *Store) addrsPrefix(name string, b netip.Prefix) string {
	return s.prefix + "networks/" + name + "/addrs/" + blockName(b) + "/"
}
func (s *Store) attachPrefix(name string, h overlay.HostID) string {
	return s.prefix + "networks/" + name + "/attach/" + string(h) + "/"
}
func (s *Store) attachKey(name string, h overlay.HostID, k overlay.AttachmentKey) string {
	return s.attachPrefix(name, h) + k.ContainerID + "/" + k.IfName
}

// blockName renders a block as a key segment: 198.19.0.64-26.
func blockName(b netip.Prefix) string {
	return b.Addr().String() + "-" + fmt.Sprint(b.Bits())
}

func parseBlockName(s string) (netip.Prefix, error) {
	return netip.ParsePrefix(strings.Replace(s, "-", "/", 1))
}

// HostRecord is what etcd knows of a host: enough to find it over gossip.
type HostRecord struct {
	// Host is the host's ID.
	Host overlay.HostID `json:"host"`
	// Underlay is the host's underlay address.
	Underlay netip.Addr `json:"underlay"`
	// VTEPMAC is the MAC address of the host's VXLAN devices.
	VTEPMAC string `json:"vtepMAC"`
	// Gossip is the host:port its memberlist listens on.
	Gossip string `json:"gossip"`
	// Updated is when the host last wrote the record.
	Updated time.Time `json:"updated"`
}

// MAC parses the record's VTEP MAC.
func (r HostRecord) MAC() (net.HardwareAddr, error) { return net.ParseMAC(r.VTEPMAC) }

// RegisterHost writes the host's record, replacing an older one.
func (s *Store) RegisterHost(ctx context.Context, rec HostRecord) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	val, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode host %s: %w", rec.Host, err)
	}
	if _, err := s.cli.Put(ctx, s.hostKey(rec.Host), string(val)); err != nil {
		return fmt.Errorf("register host %s: %w", rec.Host, err)
	}
	return nil
}

// Ping reads one key with a quorum read: it fails when etcd cannot be
// reached or has lost its quorum.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	if _, err := s.cli.Get(ctx, s.networksGenKey(), clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("etcd does not answer: %w", err)
	}
	return nil
}

// ErrBadRecord is wrapped by the errors about records in etcd that cannot
// be decoded, as opposed to etcd that cannot be read.
var ErrBadRecord = errors.New("etcd: record cannot be decoded")

// Hosts returns every registered host. Records that cannot be decoded
// are skipped and reported in the joined error, each wrapping
// ErrBadRecord, next to the good ones.
func (s *Store) Hosts(ctx context.Context) ([]HostRecord, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.prefix+"hosts/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list hosts: %w", err)
	}
	var out []HostRecord
	var errs []error
	for _, kv := range resp.Kvs {
		var rec HostRecord
		err := json.Unmarshal(kv.Value, &rec)
		if err == nil {
			_, err = rec.MAC()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrBadRecord, kv.Key, err))
			continue
		}
		out = append(out, rec)
	}
	return out, errors.Join(errs...)
}

// DeleteHost removes the host's record, its gone key, its doctor report
// and its Docker driver's records. A host with none is not an error.
func (s *Store) DeleteHost(ctx context.Context, h overlay.HostID) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	if _, err := s.cli.Txn(ctx).Then(clientv3.OpDelete(s.hostKey(h)), clientv3.OpDelete(s.goneKey(h)), clientv3.OpDelete(s.reportKey(h)),
		clientv3.OpDelete(s.dockerPrefix(h), clientv3.WithPrefix())).Commit(); err != nil {
		return fmt.Errorf("delete host %s: %w", h, err)
	}
	return nil
}

// watchRetry is the longest wait before a broken watch is established
// again; the wait is spread down to half of it (watchRetryJitter), so the
// hosts whose watches broke together, when etcd lost its leader, do not
// all come back at the same moment.
const (
	watchRetry       = time.Second
	watchRetryJitter = 0.5
)

// WatchNetwork calls fn after every change to the network's blocks, until
// ctx is done. fn must not block. The watch requires a leader, so it
// breaks when the cluster loses its quorum instead of going silent. A
// broken watch (compaction, lost connection, no leader) is re-established
// within watchRetry, and fn is called then too, since changes may have
// been missed. It returns ctx's error.
func (s *Store) WatchNetwork(ctx context.Context, name string, fn func()) error {
	return s.watch(ctx, s.blocksPrefix(name), fn)
}

// WatchNetworks calls fn after every network created or deleted, until
// ctx is done, as WatchNetwork does for blocks. fn must not block.
func (s *Store) WatchNetworks(ctx context.Context, fn func()) error {
	return s.watch(ctx, s.netdefsPrefix(), fn)
}

// watch calls fn after every change below prefix, and after every broken
// watch, until ctx is done; it returns ctx's error.
func (s *Store) watch(ctx context.Context, prefix string, fn func()) error {
	for {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range s.cli.Watch(wctx, prefix, clientv3.WithPrefix()) {
			if wr.Err() != nil {
				break
			}
			if len(wr.Events) > 0 {
				fn()
			}
		}
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fn()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff.Jitter(watchRetry, watchRetryJitter, rand.Float64())):
		}
	}
}
