package overlay

import (
	"cmp"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// DefaultResyncInterval is how often a reconciler compares desired and
// kernel state when nothing has changed: the bound on how long a device
// deleted by hand stays deleted.
const DefaultResyncInterval = 5 * time.Second

// retryInterval is how soon a reconciler tries again after a failed pass.
const retryInterval = time.Second

// ownersTimeout bounds the read of block ownership in a pass (or the
// resync interval, when that is shorter). The etcd
// client waits for a connection rather than failing; without a bound, an
// etcd outage would stall the loop instead of falling back to the last
// ownership it read.
const ownersTimeout = 3 * time.Second

// Local is what a reconciler knows about its own host.
type Local struct {
	// Host is this host's ID.
	Host HostID
	// Underlay is this host's underlay address.
	Underlay netip.Addr
	// UnderlayLink is the name of the underlay interface.
	UnderlayLink string
	// MTU is the MTU of the overlay devices.
	MTU int
	// VTEPMAC is the MAC address of this host's VXLAN devices.
	VTEPMAC net.HardwareAddr
	// BridgeMAC is the MAC address of the network's bridge on this host.
	BridgeMAC net.HardwareAddr
}

// Rejection is a block a member claims over gossip that etcd says it does
// not own. The block gets no route to that member.
type Rejection struct {
	// Host is the member that claims the block.
	Host HostID
	// Block is the block it claims.
	Block netip.Prefix
	// Owner is the block's owner in etcd, "" when unowned.
	Owner HostID
}

// Desired computes the dataplane configuration of network n: the local
// blocks are those owners assigns to local.Host; a peer is every other
// host whose gossip claims agree with owners, with a route for each
// agreeing block. known holds the last gossip state of hosts that are no
// longer alive: a host whose overlayd is restarting keeps its entries as
// long as etcd says it owns blocks. Desired is a pure function.
func Desired(n Network, local Local, owners map[netip.Prefix]HostID, alive []Member, known map[HostID]Member) (DataplaneConfig, []Rejection) {
	cfg := DataplaneConfig{
		Network:      n,
		Underlay:     local.Underlay,
		UnderlayLink: local.UnderlayLink,
		MTU:          local.MTU,
		VTEPMAC:      local.VTEPMAC,
		BridgeMAC:    local.BridgeMAC,
	}
	owned := make(map[HostID]bool)
	for b, h := range owners {
		if h == local.Host {
			cfg.Blocks = append(cfg.Blocks, b)
		}
		owned[h] = true
	}
	slices.SortFunc(cfg.Blocks, comparePrefix)

	members := make(map[HostID]Member, len(alive)+len(known))
	liveUnderlay := make(map[netip.Addr]bool, len(alive))
	for _, m := range alive {
		members[m.Host] = m
		liveUnderlay[m.Underlay] = true
	}
	for h, m := range known {
		// A live host always wins: a remembered host whose underlay
		// address now belongs to a live one (a machine reinstalled with
		// a new host ID) is left out.
		if _, live := members[h]; !live && owned[h] && !liveUnderlay[m.Underlay] {
			members[h] = m
		}
	}
	var rejected []Rejection
	for h, m := range members {
		if h == local.Host || !m.Underlay.Is4() || len(m.VTEPMAC) != 6 {
			continue
		}
		p := Peer{Host: h, Underlay: m.Underlay, VTEPMAC: m.VTEPMAC}
		for _, b := range m.Blocks[n.Name] {
			if owner := owners[b]; owner != h {
				rejected = append(rejected, Rejection{Host: h, Block: b, Owner: owner})
				continue
			}
			p.Blocks = append(p.Blocks, b)
		}
		if len(p.Blocks) == 0 {
			continue
		}
		slices.SortFunc(p.Blocks, comparePrefix)
		cfg.Peers = append(cfg.Peers, p)
	}
	slices.SortFunc(cfg.Peers, func(a, b Peer) int { return cmp.Compare(a.Host, b.Host) })
	slices.SortFunc(rejected, func(a, b Rejection) int {
		return cmp.Or(cmp.Compare(a.Host, b.Host), comparePrefix(a.Block, b.Block))
	})
	return cfg, rejected
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// Status is what a reconciler reached on its last pass.
type Status struct {
	// Passes counts completed passes, failed ones included.
	Passes uint64
	// Failures counts passes whose Set or Owners failed.
	Failures uint64
	// LastPass is when the last pass ended.
	LastPass time.Time
	// LastErr is the error of the last pass, nil when it succeeded.
	LastErr error
	// Config is the configuration last given to the dataplane.
	Config DataplaneConfig
	// Rejected are the gossip claims of the last pass that etcd denied.
	Rejected []Rejection
}

// Reconciler keeps one network's dataplane converged with block ownership
// in etcd and the peers learned over gossip. It is level-triggered: each
// pass computes the whole desired state and hands it to the dataplane, so
// a failed pass is repaired by the next one. Its methods are safe for
// concurrent use.
type Reconciler struct {
	network   Network
	local     Local
	owners    BlockOwners
	members   Membership
	dataplane Dataplane
	interval  time.Duration
	log       *slog.Logger

	kick chan struct{}

	mu sync.Mutex // guards the fields below
	// lastOwners is the last block ownership read from the store; it is
	// used while the store cannot be read, so that an etcd outage never
	// removes a peer.
	lastOwners map[netip.Prefix]HostID
	known      map[HostID]Member
	status     Status
}

// NewReconciler returns a reconciler for network n. interval is the
// resync period; zero means DefaultResyncInterval.
func NewReconciler(n Network, local Local, owners BlockOwners, members Membership, dp Dataplane, interval time.Duration, log *slog.Logger) *Reconciler {
	if interval <= 0 {
		interval = DefaultResyncInterval
	}
	return &Reconciler{
		network:   n,
		local:     local,
		owners:    owners,
		members:   members,
		dataplane: dp,
		interval:  interval,
		log:       log.With("network", n.Name),
		kick:      make(chan struct{}, 1),
		known:     make(map[HostID]Member),
	}
}

// Kick asks for a pass as soon as possible. It never blocks: kicks that
// arrive while one is pending are merged.
func (r *Reconciler) Kick() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Remember records what the hosts in members last said, as if they had
// gossiped it, unless gossip has told more already. A daemon calls it
// before its first pass with what etcd knows of every host, so that a
// restarted overlayd keeps the entries of hosts whose own overlayd is down
// at that moment: their kernels still forward. Their claims are still
// checked against block ownership in etcd.
func (r *Reconciler) Remember(members []Member) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range members {
		if _, ok := r.known[m.Host]; !ok {
			r.known[m.Host] = m
		}
	}
}

// Status returns what the last pass reached.
func (r *Reconciler) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Run makes a pass at once, then on every kick and every resync interval,
// until ctx is done. It returns ctx's error.
func (r *Reconciler) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.kick:
		case <-timer.C:
		}
		next := r.interval
		if err := r.Pass(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r.log.Warn("reconcile pass failed; retrying", "err", err, "retry", retryInterval)
			next = retryInterval
		}
		timer.Reset(next)
	}
}

// Pass makes one reconcile pass and returns its error.
func (r *Reconciler) Pass(ctx context.Context) error {
	octx, cancel := context.WithTimeout(ctx, min(ownersTimeout, r.interval))
	owners, ownersErr := r.owners.Owners(octx)
	cancel()
	alive := r.members.Members()

	r.mu.Lock()
	if ownersErr != nil {
		owners = r.lastOwners
	} else {
		r.lastOwners = owners
	}
	if owners == nil {
		// Never read ownership: programming now would remove every peer.
		r.status.Passes++
		r.status.Failures++
		r.status.LastErr = ownersErr
		r.status.LastPass = time.Now()
		r.mu.Unlock()
		return ownersErr
	}
	for _, m := range alive {
		r.known[m.Host] = m
	}
	cfg, rejected := Desired(r.network, r.local, owners, alive, r.known)
	// Forget hosts that own nothing any more, so a host removed for good
	// does not come back from memory.
	ownerSet := make(map[HostID]bool, len(owners))
	for _, h := range owners {
		ownerSet[h] = true
	}
	for h := range r.known {
		if !ownerSet[h] {
			delete(r.known, h)
		}
	}
	prevRejected := r.status.Rejected
	r.mu.Unlock()

	if !slices.Equal(rejected, prevRejected) {
		for _, rj := range rejected {
			r.log.Warn("peer claims a block etcd does not give it; not routing it", "peer", rj.Host, "block", rj.Block, "owner", rj.Owner)
		}
	}

	err := r.dataplane.Set(ctx, cfg)
	if err == nil && ownersErr != nil {
		err = ownersErr
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	r.status.Passes++
	if err != nil {
		r.status.Failures++
	}
	r.status.LastErr = err
	r.status.LastPass = time.Now()
	r.status.Config = cfg
	r.status.Rejected = rejected
	return err
}
