package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// The reads in this file are for operators (overlayctl): each is one
// etcd request, and none is on a path that serves a container.

// HostState is everything etcd knows of one host: its record, whether its
// liveness key exists, and the note that another host saw it gone.
type HostState struct {
	// Host is the host's ID.
	Host overlay.HostID `json:"host"`
	// Record is the host's record; nil when it has none (a host that
	// holds blocks but was never registered, or was removed).
	Record *HostRecord `json:"record,omitempty"`
	// Live is the host's liveness key; nil when it is gone.
	Live *LiveRecord `json:"live,omitempty"`
	// Gone is the note that the liveness key was seen gone; nil when
	// there is none.
	Gone *GoneRecord `json:"gone,omitempty"`
}

// HostStates returns every host that has a record, a liveness key or a
// gone note, sorted by ID. Values that cannot be decoded are reported in
// the joined error, each wrapping ErrBadRecord, and the host is still
// listed from its other keys.
func (s *Store) HostStates(ctx context.Context) ([]HostState, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.prefix+"hosts/", clientv3.WithPrefix()),
		clientv3.OpGet(s.prefix+"live/", clientv3.WithPrefix()),
		clientv3.OpGet(s.prefix+"gone/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("list hosts: %w", err)
	}
	byHost := make(map[overlay.HostID]*HostState)
	state := func(h overlay.HostID) *HostState {
		if st, ok := byHost[h]; ok {
			return st
		}
		st := &HostState{Host: h}
		byHost[h] = st
		return st
	}
	var errs []error
	for i, dir := range []string{"hosts/", "live/", "gone/"} {
		for _, kv := range resp.Responses[i].GetResponseRange().Kvs {
			h := overlay.HostID(strings.TrimPrefix(string(kv.Key), s.prefix+dir))
			st := state(h)
			var err error
			switch dir {
			case "hosts/":
				st.Record = new(HostRecord)
				err = json.Unmarshal(kv.Value, st.Record)
				if err != nil {
					st.Record = nil
				}
			case "live/":
				st.Live = new(LiveRecord)
				if err = json.Unmarshal(kv.Value, st.Live); err != nil {
					st.Live = &LiveRecord{Host: h} // the key exists: the host is live
				}
			case "gone/":
				st.Gone = new(GoneRecord)
				if err = json.Unmarshal(kv.Value, st.Gone); err != nil {
					st.Gone = nil
				}
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%w: %s: %w", ErrBadRecord, kv.Key, err))
			}
		}
	}
	out := make([]HostState, 0, len(byHost))
	for _, st := range byHost {
		out = append(out, *st)
	}
	slices.SortFunc(out, func(a, b HostState) int { return strings.Compare(string(a.Host), string(b.Host)) })
	return out, errors.Join(errs...)
}

// BlockState is one claimed block of a network, as etcd holds it.
type BlockState struct {
	// Block is the block's prefix.
	Block netip.Prefix `json:"block"`
	// Host owns the block; "?" when the record cannot be decoded.
	Host overlay.HostID `json:"host"`
	// Claimed is when the owner claimed it.
	Claimed time.Time `json:"claimed"`
	// Addresses is how many of the block's addresses etcd's copy holds
	// (the owner's mirror writes it, so it trails the owner's own record
	// by up to a flush).
	Addresses int `json:"addresses"`
}

// Blocks returns the claimed blocks of network n, sorted by address, with
// how many addresses etcd's copy holds in each, in one consistent read.
func (s *Store) Blocks(ctx context.Context, n overlay.Network) ([]BlockState, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	addrs := s.prefix + "networks/" + n.Name + "/addrs/"
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.blocksPrefix(n.Name), clientv3.WithPrefix()),
		clientv3.OpGet(addrs, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("list blocks of %s: %w", n.Name, err)
	}
	count := make(map[string]int)
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		block, _, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), addrs), "/")
		if ok {
			count[block]++
		}
	}
	recs := decodeBlocks(s.blocksPrefix(n.Name), resp.Responses[0].GetResponseRange().Kvs, func(b netip.Prefix) bool { return n.BlockIndex(b) >= 0 })
	out := make([]BlockState, 0, len(recs))
	for b, kv := range recs {
		out = append(out, BlockState{Block: b, Host: kv.rec.Host, Claimed: kv.rec.Claimed, Addresses: count[blockName(b)]})
	}
	slices.SortFunc(out, func(a, b BlockState) int { return a.Block.Addr().Compare(b.Block.Addr()) })
	return out, nil
}

func (s *Store) reportKey(h overlay.HostID) string { return s.prefix + "reports/" + string(h) }

// PutReport stores host h's latest doctor report (encoded by the caller:
// this package does not read it), replacing the one before. Reports are
// for operators only: nothing in the overlay acts on them.
func (s *Store) PutReport(ctx context.Context, h overlay.HostID, report []byte) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	if _, err := s.cli.Put(ctx, s.reportKey(h), string(report)); err != nil {
		return fmt.Errorf("store the doctor report of %s: %w", h, err)
	}
	return nil
}

// Reports returns the latest doctor report of every host that stored
// one.
func (s *Store) Reports(ctx context.Context) (map[overlay.HostID][]byte, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.prefix+"reports/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list doctor reports: %w", err)
	}
	out := make(map[overlay.HostID][]byte, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[overlay.HostID(strings.TrimPrefix(string(kv.Key), s.prefix+"reports/"))] = kv.Value
	}
	return out, nil
}
