package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// EndpointRecord is one container interface on a network, as the hosts'
// mirrors last copied it to etcd: its address and the record of who
// holds it.
type EndpointRecord struct {
	// Addr is the address with its block's prefix length.
	Addr netip.Prefix `json:"addr"`
	AddrRecord
}

// Endpoints returns the endpoints of network n, by address. Records that
// cannot be decoded are left out and reported in the joined error, each
// wrapping ErrBadRecord, next to the good ones.
func (s *Store) Endpoints(ctx context.Context, n overlay.Network) ([]EndpointRecord, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	prefix := s.prefix + "networks/" + n.Name + "/addrs/"
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("network %s: list its endpoints: %w", n.Name, err)
	}
	return decodeEndpoints(resp.Kvs, prefix)
}

// endpoints returns the endpoints of the given blocks of network name.
func (s *Store) endpoints(ctx context.Context, name string, blocks []netip.Prefix) ([]EndpointRecord, error) {
	var out []EndpointRecord
	var errs []error
	for _, b := range blocks {
		resp, err := s.cli.Get(ctx, s.addrsPrefix(name, b), clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("network %s: list the endpoints of block %s: %w", name, b, err)
		}
		eps, err := decodeEndpoints(resp.Kvs, s.prefix+"networks/"+name+"/addrs/")
		out = append(out, eps...)
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// decodeEndpoints decodes address records whose keys are
// prefix/<block>/<ip>.
func decodeEndpoints(kvs []*mvccpb.KeyValue, prefix string) ([]EndpointRecord, error) {
	out := make([]EndpointRecord, 0, len(kvs))
	var errs []error
	for _, kv := range kvs {
		block, ip, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), prefix), "/")
		b, berr := parseBlockName(block)
		a, aerr := netip.ParseAddr(ip)
		var rec AddrRecord
		if !ok || berr != nil || aerr != nil || !b.Contains(a) {
			errs = append(errs, fmt.Errorf("%w: key %s", ErrBadRecord, kv.Key))
			continue
		}
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrBadRecord, kv.Key, err))
			continue
		}
		out = append(out, EndpointRecord{Addr: netip.PrefixFrom(a, b.Bits()), AddrRecord: rec})
	}
	slices.SortFunc(out, func(x, y EndpointRecord) int { return x.Addr.Addr().Compare(y.Addr.Addr()) })
	return out, errors.Join(errs...)
}
