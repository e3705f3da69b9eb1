package etcd

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// VNIRange is an inclusive range of VXLAN network identifiers that
// networks created without one are given from.
type VNIRange struct{ First, Last uint32 }

// DefaultVNIRange is where a network created without a VNI takes one: the
// lowest free one. It starts at the default network's VNI.
var DefaultVNIRange = VNIRange{First: overlay.DefaultVNI, Last: overlay.DefaultVNI + 899}

// Validate reports whether the range holds at least one valid VNI.
func (r VNIRange) Validate() error {
	if r.First == 0 || r.Last > overlay.MaxVNI || r.First > r.Last {
		return fmt.Errorf("vni range %d-%d: want FIRST-LAST with 1 <= FIRST <= LAST <= %d", r.First, r.Last, overlay.MaxVNI)
	}
	return nil
}

// String returns "first-last".
func (r VNIRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// ErrNetworkInUse is wrapped by the error of a DeleteNetwork refused
// because containers still hold addresses of the network.
var ErrNetworkInUse = errors.New("etcd: network in use")

// NewNetworkID returns a random network ID (overlay.IDLen hex digits).
func NewNetworkID() string {
	b := make([]byte, overlay.IDLen/2)
	rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// fenceRetries bounds the tries of a creation or deletion whose fence
// failed because the networks changed meanwhile.
const fenceRetries = 5

// CreateNetwork stores n as a new network. A network without a VNI takes
// the lowest one of vnis that no network uses, and one without an ID a
// new one. It fails, creating nothing, with an error wrapping
// overlay.ErrConflict when the name exists, the VNI is used, or the CIDR
// overlaps another network's; wrapping overlay.ErrInvalidNetwork when n
// is not valid; and wrapping overlay.ErrPoolExhausted when vnis has no free
// VNI. Each check is fenced in the creating transaction, so two networks
// created at once cannot both break them. It returns the network as
// stored.
func (s *Store) CreateNetwork(ctx context.Context, n overlay.Network, vnis VNIRange) (overlay.Network, error) {
	return s.createNetwork(ctx, n, vnis, false)
}

// EnsureNetwork stores n as the definition of its network when none
// exists (n must name its VNI), and otherwise checks that the stored one
// is the same in address space and encapsulation (overlay.Network.Diff).
// It returns the stored definition, or an error wrapping
// overlay.ErrConflict that names the first field that differs. A start of
// every host but the first writes nothing.
func (s *Store) EnsureNetwork(ctx context.Context, n overlay.Network) (overlay.Network, error) {
	return s.createNetwork(ctx, n, VNIRange{}, true)
}

func (s *Store) createNetwork(ctx context.Context, n overlay.Network, vnis VNIRange, ensure bool) (overlay.Network, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	// A VNI to be chosen from vnis: the rest of n is checked with the
	// range's first in its place.
	auto := n.VNI == 0 && !ensure
	check := n
	if auto {
		if err := vnis.Validate(); err != nil {
			return overlay.Network{}, fmt.Errorf("%w: %w", overlay.ErrInvalidNetwork, err)
		}
		check.VNI = vnis.First
	}
	if err := check.Validate(); err != nil {
		return overlay.Network{}, err
	}
	if n.ID == "" {
		n.ID = NewNetworkID()
	}
	for range fenceRetries {
		if auto {
			n.VNI = 0 // chosen again on every try
		}
		// The networks, the fence, and the legacy record of n's name, in
		// one read.
		read, err := s.cli.Txn(ctx).Then(
			clientv3.OpGet(s.netdefsPrefix(), clientv3.WithPrefix()),
			clientv3.OpGet(s.networksGenKey()),
			clientv3.OpGet(s.networkKey(n.Name)),
		).Commit()
		if err != nil {
			return overlay.Network{}, fmt.Errorf("create network %s: list networks: %w", n.Name, err)
		}
		var genRev int64
		if kvs := read.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
			genRev = kvs[0].ModRevision
		}
		defs, _ := decodeNetworks(s.netdefsPrefix(), read.Responses[0].GetResponseRange().Kvs)
		var existing []byte
		for _, kv := range read.Responses[0].GetResponseRange().Kvs {
			if string(kv.Key) == s.netdefKey(n.Name) {
				existing = kv.Value
			}
		}
		legacy := read.Responses[2].GetResponseRange().Kvs
		if existing == nil && len(legacy) > 0 {
			existing = legacy[0].Value
			if ensure {
				// Created by an overlayd from before the list of
				// networks: list it now, once.
				if _, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(s.netdefKey(n.Name)), "=", 0)).
					Then(clientv3.OpPut(s.netdefKey(n.Name), string(existing))).Commit(); err != nil {
					return overlay.Network{}, fmt.Errorf("ensure network %s: list it: %w", n.Name, err)
				}
			}
		}
		if existing != nil {
			if !ensure {
				var o overlay.Network
				_ = json.Unmarshal(existing, &o)
				return overlay.Network{}, fmt.Errorf("network %q exists (cidr %s, vni %d): choose another name, or delete it first: %w", n.Name, o.CIDR, o.VNI, overlay.ErrConflict)
			}
			// It exists: compare, and write nothing.
			return s.sameNetwork(n, existing)
		}
		// The address space first; a VNI to be chosen (0) conflicts with
		// none.
		if err := conflicts(n, defs); err != nil {
			return overlay.Network{}, err
		}
		if auto {
			if n.VNI, err = freeVNI(defs, vnis); err != nil {
				return overlay.Network{}, fmt.Errorf("create network %s: %w", n.Name, err)
			}
		}
		val, err := json.Marshal(n)
		if err != nil {
			return overlay.Network{}, fmt.Errorf("encode network %s: %w", n.Name, err)
		}
		resp, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(s.netdefKey(n.Name)), "=", 0),
				clientv3.Compare(clientv3.CreateRevision(s.networkKey(n.Name)), "=", 0),
				clientv3.Compare(clientv3.ModRevision(s.networksGenKey()), "=", genRev)).
			Then(clientv3.OpPut(s.netdefKey(n.Name), string(val)),
				clientv3.OpPut(s.networkKey(n.Name), string(val)),
				clientv3.OpPut(s.networksGenKey(), n.Name)).
			Commit()
		if err != nil {
			return overlay.Network{}, fmt.Errorf("create network %s in etcd: %w", n.Name, err)
		}
		if resp.Succeeded {
			return n, nil
		}
		// Another network was created or deleted meanwhile: check again.
	}
	return overlay.Network{}, fmt.Errorf("create network %s: the networks in etcd kept changing while it was created; try again: %w", n.Name, overlay.ErrConflict)
}

// conflicts returns an error wrapping overlay.ErrConflict when n's VNI or
// address space is used by one of defs.
func conflicts(n overlay.Network, defs []overlay.Network) error {
	for _, o := range defs {
		if o.Name == n.Name {
			continue
		}
		if o.CIDR.IsValid() && o.CIDR.Overlaps(n.CIDR) {
			return fmt.Errorf("network %q: cidr %s overlaps network %q (%s) in etcd: give it an address space of its own: %w",
				n.Name, n.CIDR, o.Name, o.CIDR, overlay.ErrConflict)
		}
		if n.VNI != 0 && o.VNI == n.VNI {
			return fmt.Errorf("network %q: vni %d is used by network %q: choose another, or leave it out to take a free one: %w",
				n.Name, n.VNI, o.Name, overlay.ErrConflict)
		}
	}
	return nil
}

// freeVNI returns the lowest VNI of r that none of defs uses.
func freeVNI(defs []overlay.Network, r VNIRange) (uint32, error) {
	used := make(map[uint32]bool, len(defs))
	for _, o := range defs {
		used[o.VNI] = true
	}
	for v := r.First; v <= r.Last && v != 0; v++ {
		if !used[v] {
			return v, nil
		}
	}
	return 0, fmt.Errorf("every vni of %s is used: give one, or widen the range: %w", r, overlay.ErrPoolExhausted)
}

// decodeNetworks decodes network definitions, sorted by name. Those that
// cannot be decoded are left out and reported in the joined error, each
// wrapping ErrBadRecord.
func decodeNetworks(prefix string, kvs []*mvccpb.KeyValue) ([]overlay.Network, error) {
	var out []overlay.Network
	var errs []error
	for _, kv := range kvs {
		var n overlay.Network
		err := json.Unmarshal(kv.Value, &n)
		if err == nil {
			err = n.Validate()
		}
		if err == nil && n.Name != strings.TrimPrefix(string(kv.Key), prefix) {
			err = fmt.Errorf("names network %q", n.Name)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrBadRecord, kv.Key, err))
			continue
		}
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b overlay.Network) int { return cmp.Compare(a.Name, b.Name) })
	return out, errors.Join(errs...)
}

// sameNetwork decodes the stored definition of n's network and returns
// it, or an error wrapping overlay.ErrConflict that names the first
// field where n differs.
func (s *Store) sameNetwork(n overlay.Network, val []byte) (overlay.Network, error) {
	var stored overlay.Network
	if err := json.Unmarshal(val, &stored); err != nil {
		return overlay.Network{}, fmt.Errorf("decode network %s at %s: %w", n.Name, s.networkKey(n.Name), err)
	}
	if field := stored.Diff(n); field != "" {
		return stored, fmt.Errorf("network %q: configuration differs from etcd in field %s (etcd has %s, configuration has %s): change the configuration to match, or remove the network from etcd first: %w",
			n.Name, field, fieldValue(stored, field), fieldValue(n, field), overlay.ErrConflict)
	}
	return stored, nil
}

func fieldValue(n overlay.Network, field string) string {
	switch field {
	case "name":
		return n.Name
	case "cidr":
		return n.CIDR.String()
	case "blockBits":
		return fmt.Sprint(n.BlockBits)
	case "vni":
		return fmt.Sprint(n.VNI)
	case "port":
		return fmt.Sprint(n.Port)
	}
	return "?"
}

// Networks returns every network, sorted by name. Definitions that
// cannot be decoded are left out and reported in the joined error, each
// wrapping ErrBadRecord, next to the good ones.
func (s *Store) Networks(ctx context.Context) ([]overlay.Network, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.netdefsPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	return decodeNetworks(s.netdefsPrefix(), resp.Kvs)
}

// Network returns the stored definition of network name, or an error
// wrapping overlay.ErrNotFound.
func (s *Store) Network(ctx context.Context, name string) (overlay.Network, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.netdefKey(name)), clientv3.OpGet(s.networkKey(name))).Commit()
	if err != nil {
		return overlay.Network{}, fmt.Errorf("get network %s: %w", name, err)
	}
	for _, r := range resp.Responses {
		if kvs := r.GetResponseRange().Kvs; len(kvs) > 0 {
			var n overlay.Network
			if err := json.Unmarshal(kvs[0].Value, &n); err != nil {
				return overlay.Network{}, fmt.Errorf("decode network %s: %w", name, err)
			}
			return n, nil
		}
	}
	return overlay.Network{}, fmt.Errorf("network %q does not exist: %w", name, overlay.ErrNotFound)
}

// NetworkUse is who holds addresses of a network, as the hosts' mirrors
// last copied them to etcd.
type NetworkUse struct {
	// Hosts counts the container interfaces of each host.
	Hosts map[overlay.HostID]int
}

// Interfaces returns how many container interfaces hold an address.
func (u NetworkUse) Interfaces() int {
	n := 0
	for _, c := range u.Hosts {
		n += c
	}
	return n
}

// String lists the hosts and their counts: "a (2), b (1)".
func (u NetworkUse) String() string {
	hosts := make([]string, 0, len(u.Hosts))
	for h := range u.Hosts {
		hosts = append(hosts, string(h))
	}
	slices.Sort(hosts)
	for i, h := range hosts {
		hosts[i] = fmt.Sprintf("%s (%d)", h, u.Hosts[overlay.HostID(h)])
	}
	return strings.Join(hosts, ", ")
}

func (s *Store) use(name string, kvs []*mvccpb.KeyValue) NetworkUse {
	u := NetworkUse{Hosts: make(map[overlay.HostID]int)}
	prefix := s.attachNetPrefix(name)
	for _, kv := range kvs {
		if h, _, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), prefix), "/"); ok {
			u.Hosts[overlay.HostID(h)]++
		}
	}
	return u
}

// Use returns who holds addresses of network name.
func (s *Store) Use(ctx context.Context, name string) (NetworkUse, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.attachNetPrefix(name), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return NetworkUse{}, fmt.Errorf("network %s: list its containers: %w", name, err)
	}
	return s.use(name, resp.Kvs), nil
}

// DeleteNetwork removes network name and everything etcd holds of it:
// blocks, address records, attachments. While a host's container holds
// an address of it (as the hosts' mirrors copied them), it is refused with
// an error wrapping ErrNetworkInUse that names the hosts, unless force
// is set: then the addresses are released with it. The refusal is fenced
// in the deleting transaction. Each overlayd then removes the network's
// devices. A network that does not exist is an error wrapping
// overlay.ErrNotFound. It returns who held addresses.
func (s *Store) DeleteNetwork(ctx context.Context, name string, force bool) (NetworkUse, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	for range fenceRetries {
		read, err := s.cli.Txn(ctx).Then(
			clientv3.OpGet(s.netdefKey(name)),
			clientv3.OpGet(s.networkKey(name)),
			clientv3.OpGet(s.attachNetPrefix(name), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		).Commit()
		if err != nil {
			return NetworkUse{}, fmt.Errorf("delete network %s: %w", name, err)
		}
		def, legacy := read.Responses[0].GetResponseRange().Kvs, read.Responses[1].GetResponseRange().Kvs
		if len(def) == 0 && len(legacy) == 0 {
			return NetworkUse{}, fmt.Errorf("network %q does not exist: %w", name, overlay.ErrNotFound)
		}
		use := s.use(name, read.Responses[2].GetResponseRange().Kvs)
		if n := use.Interfaces(); n > 0 && !force {
			return use, fmt.Errorf("network %q: %d container interfaces on %d hosts hold addresses of it (%s): remove those containers first, or force the deletion to release their addresses everywhere: %w",
				name, n, len(use.Hosts), use, ErrNetworkInUse)
		}
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(s.netdefKey(name)), "=", modRev(def)),
			clientv3.Compare(clientv3.ModRevision(s.networkKey(name)), "=", modRev(legacy)),
		}
		if !force {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.attachNetPrefix(name)), "=", 0).WithPrefix())
		}
		resp, err := s.cli.Txn(ctx).If(cmps...).Then(
			clientv3.OpDelete(s.networkPrefix(name), clientv3.WithPrefix()),
			clientv3.OpDelete(s.netdefKey(name)),
			clientv3.OpPut(s.networksGenKey(), "-"+name),
		).Commit()
		if err != nil {
			return use, fmt.Errorf("delete network %s: %w", name, err)
		}
		if resp.Succeeded {
			return use, nil
		}
		// A container was added, or the network re-created, meanwhile.
	}
	return NetworkUse{}, fmt.Errorf("delete network %s: it kept changing while it was deleted; try again: %w", name, overlay.ErrConflict)
}

func modRev(kvs []*mvccpb.KeyValue) int64 {
	if len(kvs) == 0 {
		return 0
	}
	return kvs[0].ModRevision
}
